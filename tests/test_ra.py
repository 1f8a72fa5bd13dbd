"""Resiliency Accuracy: exactly-k sampling, the conditional BER curve, importance sampling
(docs/resiliency_accuracy.md). Statistical checks use z-tests at |z| < 4.5 and chi-square at
p > 1e-5 (as test_sampling_stats), with fixed seeds."""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxft.campaigns import ra
from onnxft.faults.sampling import Faults, sample_exact_faults, sample_faults
from onnxft.runtime.data import Dataset

from models import tiny_transformer
from test_sampling_stats import P_MIN, chi_square, plans_mixed, positions

Z = 4.5


def test_exactly_k_distinct_faults_per_item_uniform_over_all_positions():
    plans = plans_mixed()
    bits = [p.bits_per_item for p in plans]
    offsets = np.cumsum([0] + bits[:-1])
    rng = np.random.default_rng(11)
    hist = np.zeros(sum(bits))
    for _ in range(1500):
        f = sample_exact_faults(plans, 3, rng)
        assert np.array_equal(np.bincount(f.item, minlength=8), np.full(8, 3))
        glob = np.zeros(len(f), np.int64)
        for s, plan in enumerate(plans):
            sel = f.site == s
            glob[sel] = offsets[s] + positions(plan, f.subset(sel))
        for i in range(8):
            assert len(np.unique(glob[f.item == i])) == 3
        hist += np.bincount(glob, minlength=len(hist))
    pval, stat, df = chi_square(hist, np.full(len(hist), 1 / len(hist)))
    assert pval > P_MIN, f"positions chi2={stat:.1f} df={df}"


def test_exact_k_skips_protected_sites_and_refuses_bad_input():
    plans = plans_mixed()
    plans[0].site.scale = 0.0
    f = sample_exact_faults(plans, 5, np.random.default_rng(0))
    assert len(f) == 40 and not (f.site == 0).any()
    for bad in (-1,):
        try:
            sample_exact_faults(plans, bad, np.random.default_rng(0))
        except ValueError:
            continue
        raise AssertionError("k < 0 accepted")


def test_opwise_strata_reproduce_the_uniform_position_law():
    plans = plans_mixed()
    space = ra.OpWiseSpace(plans)
    assert space.bits_per_item() == sum(p.bits_per_item for p in plans)
    assert abs(space.strata.mass.sum() - 1) < 1e-12
    rng = np.random.default_rng(5)
    bits = [p.bits_per_item for p in plans]
    offsets = np.cumsum([0] + bits[:-1])
    hist = np.zeros(sum(bits))
    for _ in range(40):
        st = rng.choice(len(space.strata), size=1000, p=space.strata.mass)
        f = space.draw(st, np.zeros(1000, np.int64), rng)
        for s, plan in enumerate(plans):
            sel = f.site == s
            np.add.at(hist, offsets[s] + positions(plan, f.subset(sel)), 1)
    pval, stat, df = chi_square(hist, np.full(len(hist), 1 / len(hist)))
    assert pval > P_MIN, f"positions chi2={stat:.1f} df={df}"


def test_binomial_tail_and_k_max():
    n, p = 40, 0.07
    pmf = ra.binomial_pmf(n, p, np.arange(n + 1))
    assert abs(pmf.sum() - 1) < 1e-12
    exact = sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(6, n + 1))
    assert abs(ra.binomial_tail(n, p, 5) - exact) < 1e-13
    k = ra.choose_k_max(n, [p, p / 2], tail=1e-3)
    assert ra.binomial_tail(n, p, k) <= 1e-3 < ra.binomial_tail(n, p, k - 1)


def test_proposal_over_k_is_neyman_with_a_defensive_share():
    pmf = np.array([[0.5, 0.3, 0.0], [0.1, 0.2, 0.4]])  # two BERs, k = 1..3
    rate, weight = np.array([0.1, 0.4, 0.9]), np.array([1.0, 4.0])
    g = ra.proposal_over_k(pmf, rate, weight, defensive=0.0)
    score = np.sqrt((weight[:, None] * pmf**2).sum(axis=0) * rate)  # Lagrange: g ∝ sqrt(sum_b w_b P_b^2 E[d^2])
    assert np.allclose(g, score / score.sum())
    g = ra.proposal_over_k(pmf, rate, weight, defensive=0.5)
    avg = (pmf / pmf.sum(axis=1, keepdims=True)).mean(axis=0)
    assert np.allclose(g, 0.5 * avg + 0.5 * score / score.sum()) and (g >= 0.5 * avg - 1e-15).all()
    # balanced over BERs: the predicted variance relative to direct eval is (nearly) the same at each
    pmf = np.array([[0.6, 0.3, 0.1, 0.0], [0.0, 0.1, 0.3, 0.6]])
    rate, direct = np.array([0.01, 0.02, 0.03, 0.04]), np.array([0.12, 0.2])
    g = ra.balanced_proposal(pmf, rate, direct)
    ratio = (pmf**2 * rate / g).sum(axis=1) / direct
    assert abs(ratio[0] / ratio[1] - 1) < 0.02 and abs(g.sum() - 1) < 1e-12
    # the pilot's rate model: 1 - (1 - r)^k by maximum likelihood (all moved at k=2, none at k=1 -> 0 < r < 1)
    rng = np.random.default_rng(0)
    ks = rng.integers(1, 6, 4000)
    moved = rng.random(4000) < 1 - (1 - 0.07) ** ks
    fit = ra.moved_rate_model(ks, moved, 5)
    assert np.allclose(fit, 1 - (1 - 0.07) ** np.arange(1, 6), atol=0.01)


def _matmul_toy(k: int, classes: int, n: int, seed: int):
    """(model, x, labels) of ``x [B, k] @ W [k, classes] -> logits``, labels the fault-free argmax
    except three items (one class on), so that a fault can also make an item right."""
    rng = np.random.default_rng(seed)
    w = nh.from_array(rng.standard_normal((k, classes)).astype(np.float32), "w")
    g = h.make_graph([h.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "toy",
                     [h.make_tensor_value_info("x", T.FLOAT, ["b", k])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["b", classes])], [w])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    x = rng.standard_normal((n, k)).astype(np.float32)
    y = np.argmax(x @ nh.to_array(w), axis=1)
    y[:3] = (y[:3] + 1) % classes
    return m, x, y


def _toy(n=16, seed=0):
    """x [B, 3] @ W [3, 4] -> logits: 4 outputs x (3 products + 2 sums) x 32 bits = 640 positions."""
    m, x, y = _matmul_toy(3, 4, n, seed)
    return m, Dataset({"x": x}, y)

def _exact_ra1(runner: ra.Runner) -> float:
    """RA_1 by enumeration: every (operation, bit) position, in every item."""
    plans = runner.plans[0]
    p = plans[0]
    ok = 0
    for pos in range(p.bits_per_item):
        per = p.per_op_bits
        element, r = divmod(pos, per)
        kp = p.k * 32
        step, bit = (r // 32, r % 32) if r < kp else (p.k + (r - kp) // 32, (r - kp) % 32)
        n = len(runner.data)
        f = Faults(np.zeros(n, np.int64), np.arange(n), np.full(n, element), np.full(n, step), np.full(n, bit))
        ok += int(runner.run(0, f).sum())
    return ok / (p.bits_per_item * len(runner.data))


def test_importance_sampling_is_unbiased_against_enumeration():
    m, data = _toy()
    runner = ra.Runner(m, data, batch=16, provider="cpu")
    exact = _exact_ra1(runner)
    assert runner.clean == 13 / 16 and exact < runner.clean
    ests, ses, covered = [], [], 0
    for seed in range(30):
        e = ra.estimate_ra(runner, ra.OpWiseSpace, 1, "is", budget=320, seed=seed, pilot=64)
        ests.append(e.value)
        ses.append((e.ci[1] - e.ci[0]) / (2 * ra.Z95))
        covered += e.ci[0] <= exact <= e.ci[1]
        assert 0 < e.ess <= e.inferences
    # the mean of 30 independent estimates: its spread, not the intervals, sets the test's width
    mean, sd = float(np.mean(ests)), float(np.std(ests, ddof=1))
    z = (mean - exact) / (sd / math.sqrt(len(ests)))
    assert abs(z) < Z, f"IS mean {mean:.5f} vs exact {exact:.5f} (z={z:.2f})"
    assert covered >= 22  # 95% intervals: at least 22 of 30 (P(fewer) < 1e-5 if they are right)


def test_defensive_proposal_bounds_the_weights():
    m, data = _toy()
    runner = ra.Runner(m, data, batch=16, provider="cpu")
    st = ra.OpWiseSpace(runner.plans[0]).strata
    rng = np.random.default_rng(0)
    rates = {"class": st.classes()[:40], "site": st.site[:40], "hit": (rng.random(40) < 0.3).astype(float)}
    q = ra._proposal(st, rates, alpha=0.1)
    assert abs(q.sum() - 1) < 1e-12 and (q >= 0.1 * st.mass - 1e-15).all()
    assert (st.mass / q).max() <= 10 + 1e-9
    q0 = ra._pilot_proposal(st)  # the bit heuristic: exponent MSB 64x, other exponent bits and sign 4x
    assert abs(q0.sum() - 1) < 1e-12 and (q0 >= ra.HEURISTIC_ALPHA * st.mass - 1e-15).all()
    ratio = q0 / st.mass
    mean_prior = float((st.mass * ra.bit_prior(st)).sum())
    assert np.allclose(ratio[st.bit == 30], 0.3 + 0.7 * 64 / mean_prior)
    assert np.allclose(ratio[st.bit == 0], 0.3 + 0.7 / mean_prior)


def test_mixture_formula_against_direct_simulation():
    """acc(BER) from RA_k (conditional campaigns) equals accuracy from sample_faults at that BER."""
    model = tiny_transformer(seed=3)
    import onnxruntime as ort

    x = np.random.default_rng(2).standard_normal((64, 6, 8)).astype(np.float32)
    y = np.argmax(ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
                  .run(None, {"x": x})[0], axis=1)
    runner = ra.Runner(model, Dataset({"x": x}, y), batch=64, provider="cpu")
    n_bits = ra.OpWiseSpace(runner.plans[0]).bits_per_item()
    bers = [0.5 / n_bits, 2.0 / n_bits]  # half a flip and two flips per inference on average
    curve = ra.ra_curve(runner, bers, budget=3000, seed=1)
    for ber, point in zip(bers, curve["points"]):
        # direct simulation: the eval campaign's law (Binomial count, uniform positions)
        correct = []
        for t in range(60):
            f = sample_faults(runner.plans[0], ber, np.random.default_rng([9, t]))
            correct.append(runner.run(0, f))
        correct = np.concatenate(correct).astype(np.float64)
        direct = correct.mean()
        se_curve = (point.ci[1] - point.truncation - point.ci[0]) / (2 * ra.Z95)
        se_direct = correct.std(ddof=1) / math.sqrt(len(correct))
        z = (point.value - direct) / math.hypot(se_curve, se_direct)
        assert point.truncation < 1e-3
        assert abs(z) < Z, f"curve {point.value:.4f} vs direct {direct:.4f} at {ber:.3g} (z={z:.2f})"
    assert direct < 0.999  # the faults matter at this BER, so the comparison means something


def test_cli_ra_json_and_outputs(tmp_path, capsys):
    import json

    import onnxruntime as ort
    from models import run_cli

    model = tiny_transformer(seed=1)
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((8, 6, 8)).astype(np.float32)
    y = np.argmax(ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
                  .run(None, {"x": x})[0], axis=1)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    base = [str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "--batch", "8", "--provider", "cpu"]
    code, out, err = run_cli(["ra"] + base + ["--budget", "16", "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert {"ra", "ci", "inferences", "method", "ess", "hw"} <= set(r)
    assert r["method"] == "mc" and r["hw"] == "op" and r["inferences"] == 16 and r["ci"][0] <= r["ra"] <= r["ci"][1]
    code, out, err = run_cli(["ra"] + base + ["--budget", "16", "--hw", "os:8x8", "--method", "is", "--json",
                                              "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["hw"] == "os:8x8" and r["method"] == "is" and 0 < r["ess"] <= 16
    assert {p.name for p in (tmp_path / "o").iterdir()} == {"results.json", "results.csv", "ra.png"}
    code, out, err = run_cli(["ra"] + base + ["--budget", "96", "--curve", "--ber", "1e-6,1e-5", "--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert [p["ber"] for p in r["points"]] == [1e-6, 1e-5] and r["per_k"][0]["k"] == 0


def test_cli_ra_user_errors(capsys):
    from models import run_cli

    for argv, msg in ((["ra", "vit", "--hw", "ws:3"], "--hw"),
                      (["ra", "vit", "--curve"], "--curve and --ber"),
                      (["ra", "vit", "--curve", "--ber", "1e-9", "--hw", "equal", "--limit", "8"], "operation-wise"),
                      (["ra", "vit", "--curve", "--ber", "1e-9", "--method", "is", "--limit", "8"], "--budget only"),
                      (["ra", "vit", "--faults", "0", "--method", "is", "--limit", "8"], "at least one fault")):
        code, out, err = run_cli(argv, capsys)
        assert code == 1 and err.startswith("onnxft: error:") and msg in err and "Traceback" not in err, (argv, err)


def test_curve_truncation_is_bounded_and_exact_when_k_max_covers_everything():
    """With k_max = 1 at a BER where two flips are common, the omitted mass P(K > 1) is reported
    and the interval is widened by it; the per-k weights are the Binomial pmf."""
    m, data = _toy()
    runner = ra.Runner(m, data, batch=16, provider="cpu")
    n_bits = ra.OpWiseSpace(runner.plans[0]).bits_per_item()
    assert n_bits == 640
    ber = 1.5 / n_bits
    res = ra.ra_curve(runner, [ber], budget=64, k_max=1, seed=0)
    point = res["points"][0]
    tail = ra.binomial_tail(n_bits, ber, 1)
    assert tail > 0.3 and point.truncation == tail
    pmf = ra.binomial_pmf(n_bits, ber, [0, 1])
    ra_k = [q["ra"] for q in res["per_k"]]  # with k_max = 1 every inference has k = 1: g(1) = 1
    inner = pmf @ ra_k
    assert abs(point.value - (inner + tail * inner / (1 - tail))) < 1e-12
    assert point.ci[1] - point.ci[0] >= tail  # whatever RA_k for k > 1 are, the interval holds them


def test_ra_is_scored_by_the_shared_outcome_rules():
    """Items are classified masked / SDC / DUE against the fault-free run (campaigns.outcomes):
    checked here against a hand classification of the logits; with --metric sdc RA = 1 - SDC - DUE
    (no labels needed) for plain MC and for importance sampling, whose SDC and DUE estimates share
    the draws and weights; --metric top1 needs labels and a DUE item is never correct."""
    from onnxft.campaigns.outcomes import DUE, MASKED, SDC

    m, data = _toy()
    top1 = ra.Runner(m, data, batch=16, provider="cpu")
    rng = np.random.default_rng(4)
    clean = top1.clean_out[0][0]
    seen = set()
    for _ in range(40):
        f = sample_exact_faults(top1.plans[0], 3, rng)
        good, codes = top1.run_codes(0, f)
        out = top1.sess.run(top1.feeds(0), f, top1.plans[0])[0]
        due = ~np.isfinite(out).all(axis=1)
        sdc = ~due & (np.argmax(out, axis=1) != np.argmax(clean, axis=1))
        assert np.array_equal(codes, np.where(due, DUE, np.where(sdc, SDC, MASKED)))
        assert np.array_equal(good, (np.argmax(out, axis=1) == data.labels) & ~due)
        seen |= set(codes.tolist())
    assert seen == {MASKED, SDC, DUE}  # every class occurred, so the comparison means something
    unlabelled = Dataset({"x": data.batch(0, len(data))["x"]}, None)
    try:
        ra.Runner(m, unlabelled, batch=16, provider="cpu")
        raise AssertionError("top-1 RA without labels accepted")
    except ValueError as exc:
        assert "--metric sdc" in str(exc)
    masked = ra.Runner(m, unlabelled, batch=16, provider="cpu", metric="sdc")
    assert masked.clean == 1.0
    for method, space in (("mc", None), ("is", ra.OpWiseSpace)):
        e = ra.estimate_ra(masked, space, 1, method, budget=160, seed=1, pilot=32)
        assert e.extra["metric"] == "sdc" and e.extra["sdc"] + e.extra["due"] > 0
        assert abs(e.value - (1 - e.extra["sdc"] - e.extra["due"])) < 1e-12, method
        for key in ("sdc", "due"):
            lo, hi = e.extra[f"{key}_ci"]
            assert lo <= e.extra[key] <= hi


def test_cli_ra_outcome_options(tmp_path, capsys):
    import json

    from models import run_cli

    m, data = _toy()
    onnx.save(m, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=data.batch(0, len(data))["x"])  # no labels: --metric sdc needs none
    base = ["ra", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz"), "--batch", "16", "--provider", "cpu",
            "--budget", "32", "--json"]
    code, out, err = run_cli(base + ["--metric", "sdc", "--sdc", "tol", "--tol", "rel=1e-2,abs=1e-3"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["metric"] == "sdc" and r["outputs"]["sdc_criterion"] == "tol" and r["clean"] == 1.0
    assert {"ra", "ci", "inferences", "method", "ess", "hw", "sdc", "sdc_ci", "due", "due_ci"} <= set(r)
    assert abs(r["ra"] - (1 - r["sdc"] - r["due"])) < 1e-12
    code, out, err = run_cli(base, capsys)
    assert code == 1 and "--metric sdc" in err and "Traceback" not in err
    code, out, err = run_cli(base + ["--metric", "sdc", "--output", "nope"], capsys)
    assert code == 1 and "--output" in err and "Traceback" not in err


def _toy2(n=16, seed=5):
    """x [B, 2] @ W [2, 2]: 2 outputs x (2 products + 1 sum) x 32 bits = 192 positions, so every
    pair of positions (18,336) can be enumerated."""
    return _matmul_toy(2, 2, n, seed)

def _decode_positions(plan, pos):
    element, r = np.divmod(pos, plan.per_op_bits)
    kp = plan.k * 32
    step = np.where(r < kp, r // 32, plan.k + (r - kp) // 32)
    bit = np.where(r < kp, r % 32, (r - kp) % 32)
    return element, step, bit


_EXACT_TOY2: list = []


def _exact_toy2() -> tuple[float, float, float]:
    """(RA_0, RA_1, RA_2) of ``_toy2`` exactly: every position, and every pair of positions, in
    every item (64 copies of the 16 items per run, one position or pair each)."""
    from itertools import combinations

    if _EXACT_TOY2:
        return _EXACT_TOY2[0]
    m, x, y = _toy2()
    copies = 64
    big = ra.Runner(m, Dataset({"x": np.tile(x, (copies, 1))}, np.tile(y, copies)), batch=16 * copies, provider="cpu")
    plan = big.plans[0][0]
    assert plan.bits_per_item == 192
    exact = [float(np.mean(big.clean_correct[0][:16]))]
    for k in (1, 2):
        tuples = np.array(list(combinations(range(192), k)))
        ok = 0
        for start in range(0, len(tuples), copies):
            chunk = tuples[start:start + copies]
            c = len(chunk)
            item = np.arange(16 * c)
            pos = np.repeat(chunk, 16, axis=0).reshape(-1)  # item c*16 + b gets tuple c
            e, st, b = _decode_positions(plan, pos)
            f = Faults(np.zeros(len(pos), np.int64), np.repeat(item, k), e, st, b)
            ok += int(big.run(0, f)[:16 * c].sum())
        exact.append(ok / (len(tuples) * 16))
    _EXACT_TOY2.append(tuple(exact))
    return _EXACT_TOY2[0]


def test_curve_is_unbiased_against_enumeration():
    """acc(BER) of the 2x2 MatMul from exact RA_0, RA_1, RA_2 (k_max = 2; the omitted P(K > 2),
    0.4-2.3% here, bounded), against 30 independent curves whose inferences draw k from the Neyman law over k:
    their mean within 4.5 standard errors at two BERs, and at least 22 of 30 intervals cover."""
    m, x, y = _toy2()
    ra0, ra1, ra2 = _exact_toy2()
    runner = ra.Runner(m, Dataset({"x": x}, y), batch=16, provider="cpu")
    bers = [0.3 / 192, 0.6 / 192]
    exact, tails = [], []
    for b in bers:
        pmf = ra.binomial_pmf(192, b, [0, 1, 2])
        exact.append(float(pmf @ [ra0, ra1, ra2]))
        tails.append(ra.binomial_tail(192, b, 2))
    values, covered = [[], []], [0, 0]
    for seed in range(30):
        res = ra.ra_curve(runner, bers, budget=160, k_max=2, seed=seed)
        for i, p in enumerate(res["points"]):
            values[i].append(p.value)
            covered[i] += p.ci[0] <= exact[i] <= p.ci[1]
    for i in range(2):
        v = np.array(values[i])
        # the point adds T x the accuracy given K <= 2 for the omitted k > 2: it estimates exact / (1 - T)
        target = exact[i] / (1 - tails[i])
        z = (v.mean() - target) / (v.std(ddof=1) / math.sqrt(len(v)))
        assert abs(z) < Z, (bers[i], v.mean(), target, z)
        assert covered[i] >= 22, (bers[i], covered[i])  # the interval holds sum_{k<=2} and the T bound
    assert ra2 < ra1 < ra0  # faults matter on this toy


def test_importance_sampling_k2_is_unbiased_against_enumeration():
    """RA_2 (two distinct faults, operation-wise) of a 2x2 MatMul computed exactly by running every
    pair of its 192 positions in every item (64 copies of the 16 items per run, one pair each),
    against 30 independent IS estimates whose proposal is a product of per-fault proposals (weight
    the product of per-fault ratios, tuples with a repeated position weighing 0, scaled by
    1 / P(distinct))."""
    m, x, y = _toy2()
    exact = _exact_toy2()[2]
    small = ra.Runner(m, Dataset({"x": x}, y), batch=16, provider="cpu")
    assert exact < small.clean
    ests, covered = [], 0
    for seed in range(30):
        e = ra.estimate_ra(small, ra.OpWiseSpace, 2, "is", budget=320, seed=seed, pilot=64)
        ests.append(e.value)
        covered += e.ci[0] <= exact <= e.ci[1]
        assert 0 < e.ess <= e.inferences
    mean, sd = float(np.mean(ests)), float(np.std(ests, ddof=1))
    z = (mean - exact) / (sd / math.sqrt(len(ests)))
    assert abs(z) < Z, f"IS mean {mean:.5f} vs exact RA_2 {exact:.5f} (z={z:.2f})"
    assert covered >= 22
    # plain MC (sample_exact_faults) agrees too
    mc = ra.estimate_ra(small, None, 2, "mc", budget=3200, seed=0)
    assert mc.ci[0] - 0.01 <= exact <= mc.ci[1] + 0.01


def test_distinct_tuples_weigh_by_the_target_law():
    """A tuple with a repeated position is outside the uniform k-subset law: weight 0; the others
    are scaled by 1 / P(distinct) = 1 / prod_{i<k} (1 - i/n)."""
    m, x, y = _toy2()
    runner = ra.Runner(m, Dataset({"x": x}, y), batch=16, provider="cpu")
    space = ra.OpWiseSpace(runner.plans[0])
    assert abs(space.distinct_probability(3) - (1 - 1 / 192) * (1 - 2 / 192)) < 1e-15
    st = space.strata
    strata = np.array([[0, 0]] * 16)  # both faults in one stratum of 4 operations: collisions are common
    f, valid = space.draw_tuples(strata, np.random.default_rng(0))
    assert 0 < valid.sum() < 16 and set(f.item.tolist()) == set(np.flatnonzero(valid).tolist())
    assert st.mass[0] > 0
