"""Statistical tests of the fault sampler (docs/fault_model.md, "Sampling"), with fixed seeds.

Per site and per item the number of flips must be Binomial(n, BER x scale) with n the site's bit
positions per item, and the flipped positions a uniformly random set of distinct (operation, bit)
pairs. Tests use z-tests at 4.5 sigma and chi-square goodness-of-fit tests at p > 1e-4 (the
chi-square tail is computed with the regularized incomplete gamma function; no scipy).
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxft.faults.sampling import Faults, SitePlan, sample_faults
from onnxft.faults.sites import Site
from onnxft.passes.inject import SiteSelection, inject
from onnxft.runtime.session import InjectionSession

Z_MAX = 4.5
P_MIN = 1e-4


# --------------------------------------------------------------------------------------------
# statistics without scipy
# --------------------------------------------------------------------------------------------


def _gammq(a: float, x: float) -> float:
    """Regularized upper incomplete gamma Q(a, x) (series / Lentz continued fraction)."""
    if x <= 0:
        return 1.0
    gln = math.lgamma(a)
    if x < a + 1:  # series for P, Q = 1 - P
        term = total = 1.0 / a
        ap = a
        for _ in range(100000):
            ap += 1
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(-x + a * math.log(x) - gln))
    tiny = 1e-300
    b = x + 1 - a
    c = 1 / tiny
    d = 1 / b
    hh = d
    for i in range(1, 100000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        delta = d * c
        hh *= delta
        if abs(delta - 1) < 1e-15:
            break
    return math.exp(-x + a * math.log(x) - gln) * hh


def chi2_sf(stat: float, df: int) -> float:
    return _gammq(df / 2.0, stat / 2.0)


def test_chi2_sf_known_values():
    assert chi2_sf(3.841458820694124, 1) == pytest.approx(0.05, rel=1e-6)
    assert chi2_sf(18.307038053275146, 10) == pytest.approx(0.05, rel=1e-6)
    assert chi2_sf(124.34211340400407, 100) == pytest.approx(0.05, rel=1e-6)
    assert chi2_sf(2.0, 2) == pytest.approx(math.exp(-1), rel=1e-9)


def chi_square(observed, expected_probs, min_expected=5.0):
    """Pearson chi-square p-value; adjacent cells with small expectations are merged."""
    observed = np.asarray(observed, np.float64)
    probs = np.asarray(expected_probs, np.float64)
    assert abs(probs.sum() - 1) < 1e-9
    expected = probs * observed.sum()
    obs_m, exp_m = [], []
    o_acc = e_acc = 0.0
    for o, e in zip(observed, expected):
        o_acc += o
        e_acc += e
        if e_acc >= min_expected:
            obs_m.append(o_acc)
            exp_m.append(e_acc)
            o_acc = e_acc = 0.0
    if e_acc > 0 or o_acc > 0:
        obs_m[-1] += o_acc
        exp_m[-1] += e_acc
    obs_m, exp_m = np.array(obs_m), np.array(exp_m)
    stat = float(((obs_m - exp_m) ** 2 / exp_m).sum())
    df = len(obs_m) - 1
    assert df >= 1
    return chi2_sf(stat, df), stat, df


def binom_pmf(n: int, p: float, ks: np.ndarray) -> np.ndarray:
    ks = np.asarray(ks)
    logc = np.array([math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) for k in ks])
    return np.exp(logc + ks * math.log(p) + (n - ks) * math.log1p(-p))


def check_binomial(counts, n, p, what):
    """z-tests on mean and variance and a chi-square fit of the count histogram."""
    counts = np.asarray(counts, np.float64)
    N = counts.size
    q = 1 - p
    mean, var = n * p, n * p * q
    z_mean = (counts.mean() - mean) / math.sqrt(var / N)
    assert abs(z_mean) < Z_MAX, f"{what}: mean {counts.mean():.4f} vs {mean:.4f} (z={z_mean:.2f})"
    mu4 = var * (1 + 3 * (n - 2) * p * q)  # fourth central moment of Binomial(n, p)
    z_var = (counts.var(ddof=1) - var) / math.sqrt((mu4 - var ** 2 * (N - 3) / (N - 1)) / N)
    assert abs(z_var) < Z_MAX, f"{what}: variance {counts.var(ddof=1):.4f} vs {var:.4f} (z={z_var:.2f})"
    kmax = int(counts.max())
    ks = np.arange(kmax + 1)
    probs = binom_pmf(n, p, ks)
    probs[-1] += max(0.0, 1 - probs.sum())  # upper tail into the last cell
    hist = np.bincount(counts.astype(np.int64), minlength=kmax + 1)
    pval, stat, df = chi_square(hist, probs / probs.sum())
    assert pval > P_MIN, f"{what}: count histogram chi2={stat:.1f} df={df} p={pval:.2e}"


# --------------------------------------------------------------------------------------------
# synthetic site plans (no onnxruntime needed)
# --------------------------------------------------------------------------------------------


def make_site(kind, fmt, widths, bias=False, scale=1.0):
    return Site(id="s", node=f"{kind}_{fmt}", op_type="Conv" if kind == "conv" else "X", kind=kind, format=fmt,
                origin="X", origin_node="n", output="y", dtype="float16" if fmt == "fp16" else "float32",
                widths=widths, bias=bias, scale=scale)


def plan_elementwise(items=8, elements=10, width=32, scale=1.0):
    return SitePlan(make_site("elementwise", "fp32", {"element": width}, scale=scale), (items, elements),
                    items, elements, width)


def plan_gemm(items=8, elements=3, k=5, wp=16, wa=32, bias=False, kind="gemm", fmt="fp16", scale=1.0):
    per = k * wp + (k - 1) * wa + (wa if bias else 0)
    return SitePlan(make_site(kind, fmt, {"product": wp, "sum": wa}, bias=bias, scale=scale), (items, elements),
                    items, elements, per, k, (items, k), (k, elements))


def plans_mixed():
    return [plan_elementwise(), plan_gemm(), plan_gemm(elements=2, k=4, bias=True, kind="conv", fmt="int8")]


def positions(plan: SitePlan, f: Faults) -> np.ndarray:
    """Inverse of the decode: (element, step, bit) -> position in [0, n) of one item."""
    if plan.site.kind == "elementwise":
        return f.element * plan.per_op_bits + f.bit
    wp, wa, k = plan.site.widths["product"], plan.site.widths["sum"], plan.k
    off = np.where(f.step < k, f.step * wp, k * wp + (f.step - k) * wa) + f.bit
    return f.element * plan.per_op_bits + off


def sub(f: Faults, sel) -> Faults:
    return Faults(*(getattr(f, n)[sel] for n in ("site", "item", "element", "step", "bit")))


def run_trials(plans, ber, trials, seed):
    rng = np.random.default_rng(seed)
    return [sample_faults(plans, ber, rng) for _ in range(trials)]


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


def test_counts_per_site_and_item_are_binomial():
    plans = plans_mixed()
    ber, trials = 0.02, 2500
    runs = run_trials(plans, ber, trials, seed=1)
    for s, plan in enumerate(plans):
        counts = np.stack([np.bincount(f.item[f.site == s], minlength=plan.items) for f in runs])  # [trials, items]
        n = plan.bits_per_item
        check_binomial(counts.reshape(-1), n, ber, f"site {s} ({plan.site.kind}, n={n})")
        for item in (0, plan.items - 1):  # every item on its own
            check_binomial(counts[:, item], n, ber, f"site {s} item {item}")
        # items are independent trials: no correlation between two items' counts
        r = np.corrcoef(counts[:, 0], counts[:, 1])[0, 1]
        assert abs(r) * math.sqrt(trials) < Z_MAX


def test_ber_scale_multiplies_the_rate():
    plans = [plan_elementwise(elements=20, scale=0.25), plan_elementwise(elements=20)]
    runs = run_trials(plans, 0.04, 1500, seed=2)
    for s, p in ((0, 0.01), (1, 0.04)):
        counts = np.concatenate([np.bincount(f.item[f.site == s], minlength=8) for f in runs])
        check_binomial(counts, 640, p, f"site {s}")


def test_positions_uniform_over_operation_and_bit():
    plans = plans_mixed()
    runs = run_trials(plans, 0.05, 1200, seed=3)
    allf = Faults.concat(runs)
    for s, plan in enumerate(plans):
        f = sub(allf, allf.site == s)
        per = plan.per_op_bits
        # every field in range
        assert (f.element >= 0).all() and (f.element < plan.elements).all()
        assert (f.item >= 0).all() and (f.item < plan.items).all()
        pos = positions(plan, f)
        assert (pos >= 0).all() and (pos < plan.bits_per_item).all()
        # joint: uniform over all (element, operation, bit) positions of an item
        pval, stat, df = chi_square(np.bincount(pos, minlength=plan.bits_per_item),
                                    np.full(plan.bits_per_item, 1 / plan.bits_per_item))
        assert pval > P_MIN, f"site {s}: positions chi2={stat:.1f} df={df} p={pval:.2e}"
        if plan.site.kind == "elementwise":
            assert (f.step == 0).all()
            pval, stat, df = chi_square(np.bincount(f.bit, minlength=per), np.full(per, 1 / per))
            assert pval > P_MIN, f"bits chi2={stat:.1f}"
            continue
        k, wp, wa = plan.k, plan.site.widths["product"], plan.site.widths["sum"]
        n_steps = 2 * k - 1 + (1 if plan.site.bias else 0)
        is_prod = f.step < k
        assert (f.step >= 0).all() and (f.step < n_steps).all()
        assert (f.bit[is_prod] < wp).all() and (f.bit[~is_prod] < wa).all()
        # bit positions: bit b exists in every operation wider than b
        widths = np.array([wp] * k + [wa] * (n_steps - k))
        bit_w = np.array([(widths > b).sum() for b in range(max(wp, wa))], np.float64)
        pval, stat, df = chi_square(np.bincount(f.bit, minlength=len(bit_w)), bit_w / bit_w.sum())
        assert pval > P_MIN, f"site {s}: bits chi2={stat:.1f} df={df} p={pval:.2e}"
        # step classes weighted by their bit counts: products, partial sums (, bias add)
        cls = np.where(is_prod, 0, np.where(f.step < 2 * k - 1, 1, 2))
        w = np.array([k * wp, (k - 1) * wa] + ([wa] if plan.site.bias else []), np.float64)
        pval, stat, df = chi_square(np.bincount(cls, minlength=len(w)), w / w.sum())
        assert pval > P_MIN, f"site {s}: step classes chi2={stat:.1f} p={pval:.2e}"
        # each step, weighted by its width
        pval, stat, df = chi_square(np.bincount(f.step, minlength=n_steps), widths / widths.sum())
        assert pval > P_MIN, f"site {s}: steps chi2={stat:.1f} p={pval:.2e}"


def test_positions_distinct_within_an_item():
    plans = plans_mixed()
    for ber, seed in ((0.3, 4), (0.9, 5)):
        rng = np.random.default_rng(seed)
        total = 0
        for _ in range(40):
            f = sample_faults(plans, ber, rng)
            key = np.stack([f.site, f.item, f.element, f.step, f.bit], 1)
            assert len(np.unique(key, axis=0)) == len(f)
            total += len(f)
        assert total > 40 * 0.3 * sum(p.items * p.bits_per_item for p in plans) * 0.9


def test_ber_one_flips_every_bit():
    plans = plans_mixed()
    f = sample_faults(plans, 1.0, np.random.default_rng(6))
    for s, plan in enumerate(plans):
        fs = sub(f, f.site == s)
        for item in range(plan.items):
            pos = np.sort(positions(plan, sub(fs, fs.item == item)))
            np.testing.assert_array_equal(pos, np.arange(plan.bits_per_item))


def test_ber_zero_and_bad_ber():
    assert len(sample_faults(plans_mixed(), 0.0, np.random.default_rng(0))) == 0
    for bad in (-1e-9, 1.5):
        with pytest.raises(ValueError):
            sample_faults(plans_mixed(), bad, np.random.default_rng(0))


def test_same_seed_same_faults():
    plans = plans_mixed()
    a = [sample_faults(plans, 0.01, np.random.default_rng(42)) for _ in range(2)]
    for field in ("site", "item", "element", "step", "bit"):
        np.testing.assert_array_equal(getattr(a[0], field), getattr(a[1], field))
    assert len(a[0]) > 0
    # a stream of trials from one generator is reproducible too
    r1, r2 = run_trials(plans, 0.01, 20, 7), run_trials(plans, 0.01, 20, 7)
    for x, y in zip(r1, r2):
        assert list(x.rows()) == list(y.rows())
    other = sample_faults(plans, 0.01, np.random.default_rng(43))
    assert list(other.rows()) != list(a[0].rows())


def test_low_ber_large_n_not_rounded_to_zero():
    """p = 1e-11 with n ~ 1e9 bits per item: P(k > 0) = 1 - (1 - p)^n ~ 1%, exactly."""
    items = 1000
    plan = plan_gemm(items=items, elements=2 ** 20, k=16, wp=32, wa=32)
    n = plan.bits_per_item
    assert n > 1e9
    ber, trials = 1e-11, 100
    rng = np.random.default_rng(8)
    hits = 0
    multi = 0
    for _ in range(trials):
        f = sample_faults([plan], ber, rng)
        c = np.bincount(f.item, minlength=items)
        hits += int((c > 0).sum())
        multi += int((c > 1).sum())
        assert (f.element < plan.elements).all() and (f.step < 2 * plan.k - 1).all()
    N = items * trials
    p_any = -math.expm1(n * math.log1p(-ber))
    z = (hits / N - p_any) / math.sqrt(p_any * (1 - p_any) / N)
    assert abs(z) < Z_MAX, f"P(k>0) observed {hits / N:.5f}, expected {p_any:.5f} (z={z:.2f})"
    assert hits > 500
    p_multi = 1 - sum(binom_pmf(n, ber, np.arange(2)))
    assert multi <= max(10, 10 * p_multi * N)


# --------------------------------------------------------------------------------------------
# with a real injection graph: plans from onnxruntime, per-site BER scale 0
# --------------------------------------------------------------------------------------------


def _two_site_model():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    nodes = [h.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
             h.make_node("Add", ["m", "m"], ["y"], name="protected_add")]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["B", 3, 6])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["B", 3, 4])], [nh.from_array(w, "w")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def test_scale_zero_site_never_gets_faults():
    r = inject(_two_site_model(), SiteSelection(scales=(("protected", 0.0),)))
    onnx.checker.check_model(r.model, full_check=True)
    sess = InjectionSession(r.model, "cpu")
    assert [s.scale for s in sess.table.sites] == [1.0, 0.0]
    x = np.random.default_rng(1).standard_normal((4, 3, 6)).astype(np.float32)
    plans = sess.plans({"x": x})
    assert plans[0].bits_per_item == 12 * (6 * 32 + 5 * 32) and plans[1].bits_per_item == 12 * 32
    assert [p.items for p in plans] == [4, 4]
    rng = np.random.default_rng(9)
    counts = []
    for _ in range(300):
        f = sample_faults(plans, 0.01, rng)
        assert not (f.site == 1).any()
        counts.append(np.bincount(f.item[f.site == 0], minlength=4))
    check_binomial(np.concatenate(counts), plans[0].bits_per_item, 0.01, "unprotected MatMul")
    # even at BER 1 the protected site stays clean; the other flips every bit
    f = sample_faults(plans, 1.0, rng)
    assert not (f.site == 1).any() and (f.site == 0).sum() == 4 * plans[0].bits_per_item
