"""Vulnerability factors: common random numbers, paired intervals, the BER search, input sites and
patches, and the ``onnxft vuln`` verb."""
import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models import labelled_data, tiny_cnn, tiny_transformer, run_cli
from onnxft.analysis import grouping
from onnxft.campaigns.vuln import (Campaign, Component, paired_interval, patch_components, search_ber,
                                   target_accuracy, vulnerability_factors)
from onnxft.faults.sampling import Faults, sample_faults
from onnxft.passes.inject import inject, prepare
from onnxft.passes.input_sites import add_input_sites
from onnxft.runtime.data import Dataset
from onnxft.runtime.session import InjectionSession


@pytest.mark.parametrize("loss", [0.1, 0.2, 0.3])
def test_ber_search_finds_the_known_answer(loss):
    # accuracy(b) = 0.9 exp(-b / 3e-8): the BER that costs a relative `loss` is -3e-8 ln(1 - loss)
    calls = []

    def accuracy(b):
        calls.append(b)
        return 0.9 * math.exp(-b / 3e-8)

    goal = target_accuracy(0.9, loss)
    ber, points = search_ber(accuracy, goal)
    exact = -3e-8 * math.log(1 - loss)
    assert abs(ber / exact - 1) < 0.02
    assert len(calls) == len(points) <= 12 + 7


def test_ber_search_step_function_and_shared_cache():
    # a step at 4e-7 (what a tiny model's accuracy looks like): the answer lies within 2% of the step
    cache = {}
    b1, _ = search_ber(lambda b: 1.0 if b < 4e-7 else 0.5, 0.9, cache=cache)
    assert 4e-7 / 1.02 < b1 < 4e-7 * 1.02
    n = len(cache)
    b2, _ = search_ber(lambda b: 1.0 if b < 4e-7 else 0.5, 0.8, cache=cache)
    assert b2 == b1 and len(cache) == n  # the second target reused every evaluation


def test_ber_search_refuses_unreachable_targets():
    with pytest.raises(ValueError, match="stays above"):
        search_ber(lambda b: 0.9, 0.5)
    with pytest.raises(ValueError, match="already"):
        search_ber(lambda b: 0.1, 0.5)
    assert target_accuracy(0.8, 0.1, "absolute") == pytest.approx(0.7)
    assert target_accuracy(0.8, 0.1) == pytest.approx(0.72)


def test_paired_interval():
    lo, hi = paired_interval(3, 1, 100)
    half = 1.959963984540054 * math.sqrt((0.04 - 0.02 ** 2) / 100)
    assert (lo, hi) == pytest.approx((0.02 - half, 0.02 + half))
    assert paired_interval(0, 0, 50) == pytest.approx((-0.06, 0.06))  # rule of three


@pytest.fixture(scope="module")
def campaign():
    m = tiny_transformer()
    x, y = labelled_data(m, 48)
    sess = InjectionSession(inject(m).model, "cpu")
    return Campaign(sess, Dataset({"x": x}, y), batch=16, seed=3)


def test_protecting_everything_recovers_the_clean_accuracy_exactly(campaign):
    ber = 3e-5
    everything = Component("all", frozenset(range(len(campaign.table.sites))))
    nothing = Component("none", frozenset({0}), bit=40)  # no fault has bit 40
    run = vulnerability_factors(campaign, ber, [everything, nothing], trials=2, max_trials=2)
    assert campaign.clean == 1.0  # labels are the model's own predictions
    assert 0 < run.accuracy < 1
    f_all, f_none = run.factors
    assert f_all.factor == pytest.approx(campaign.clean - run.accuracy)
    assert f_all.lost == 0 and f_all.faults_share == 1.0
    assert f_none.factor == 0 and f_none.ci == pytest.approx((-3 / run.n, 3 / run.n))
    assert run.accuracy == campaign.accuracy(ber, trials=2)  # the same seeds: the same faults


def test_factors_of_a_partition_use_the_same_faults(campaign):
    groups = grouping.modules(campaign.table)
    comps = [Component(g.name, frozenset(g.sites)) for g in groups]
    run = vulnerability_factors(campaign, 3e-5, comps, trials=1, max_trials=1)
    assert sum(f.faults_share for f in run.factors) == pytest.approx(1.0)
    again = vulnerability_factors(campaign, 3e-5, comps[::-1], trials=1, max_trials=1)
    assert [f.factor for f in again.factors] == [f.factor for f in run.factors][::-1]


def test_adaptive_trials_stop_at_the_width_or_the_cap(campaign):
    comp = [Component("all", frozenset(range(len(campaign.table.sites))))]
    capped = vulnerability_factors(campaign, 3e-5, comp, trials=1, max_trials=3, ci_width=0.0)
    assert capped.trials == 3
    loose = vulnerability_factors(campaign, 3e-5, comp, trials=1, max_trials=3, ci_width=1.0)
    assert loose.trials == 1


def test_filtering_a_component_matches_scale_zero_in_distribution(campaign):
    # Faults outside C after filtering vs faults sampled with C at scale 0: same mean count.
    plans = campaign.plans[0]
    c = {i for i, s in enumerate(campaign.table.sites) if s.kind == "gemm"}
    from onnxft.campaigns.vuln import scaled_plans

    zero = scaled_plans(plans, {i: 0.0 for i in c})
    rng = np.random.default_rng(0)
    ber = 1e-4
    filtered = [int(np.sum(~np.isin(sample_faults(plans, ber, rng).site, list(c)))) for _ in range(300)]
    scaled = [len(sample_faults(zero, ber, rng)) for _ in range(300)]
    expected = ber * sum(p.bits_per_item * p.items for i, p in enumerate(plans) if i not in c)
    for counts in (filtered, scaled):
        assert abs(np.mean(counts) - expected) < 5 * math.sqrt(expected / 300)


def test_input_site_flips_the_input_value():
    m = tiny_cnn()
    x, _ = labelled_data(m, 4)
    model = add_input_sites(prepare(m)).model
    sess = InjectionSession(inject(model, prepared=True).model, "cpu")
    idx = grouping.input_sites(sess.table)
    assert len(idx) == 1 and sess.table.sites[idx[0]].node == "onnxft.input/x"
    e = 2 * 8 + 5  # element (row 2, col 5) of item 1's single channel: flip its sign bit
    faults = Faults(*(np.array([v], np.int64) for v in (idx[0], 1, e, 0, 31)))
    out = sess.run({"x": x}, faults)[0]
    ref_x = x.copy()
    ref_x[1, 0, 2, 5] *= -1
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": ref_x})[0]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,patch", [("vit", (4, 4)), ("resnet", (4, 4))])
def test_patch_grid_of_the_samples(name, patch):
    from onnxft.api import load

    m, _, data = load(name)
    model = add_input_sites(prepare(m)).model
    x = np.load(data)["x"][:2]
    camp = Campaign(InjectionSession(inject(model, prepared=True).model, "cpu"),
                    Dataset({"x": x}, np.load(data)["y"][:2]), batch=2)
    comps, grid = patch_components(camp, model)
    assert tuple(grid["patch"]) == patch and (grid["rows"], grid["cols"]) == (7, 7)
    elems = np.concatenate([c.elements for c in comps])
    assert sorted(elems.tolist()) == list(range(28 * 28))  # a partition of the image
    c = next(c for c in comps if c.info == {"row": 1, "col": 2})
    assert sorted(c.elements.tolist()) == sorted(r * 28 + q for r in range(4, 8) for q in range(8, 12))


run = run_cli


@pytest.fixture(scope="module")
def cnn_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("vuln")
    m = tiny_cnn()
    onnx.save(m, d / "cnn.onnx")
    x, y = labelled_data(m, 24)
    np.savez(d / "cnn.npz", x=x, y=y)
    return d


def test_cli_vuln_end_to_end(cnn_files, capsys):
    out_dir = cnn_files / "out"
    code, out, err = run(["vuln", str(cnn_files / "cnn.onnx"), "--data", str(cnn_files / "cnn.npz"),
                          "-g", "model,layer,module,patch,bit", "--target-loss", "0.3", "--trials", "1",
                          "--max-trials", "2", "--batch", "12", "--patch", "4", "--quiet", "--out", str(out_dir)],
                         capsys)
    assert code == 0, err
    res = json.loads((out_dir / "results.json").read_text())
    assert {s["part"] for s in res["searches"]} == {"network", "input"}
    net = next(r for r in res["runs"] if r["part"] == "network")
    assert {f["granularity"] for f in net["factors"]} == {"layer", "module", "bit"}
    # no numbered scopes and no residual joins: one segment per Conv/Gemm (structural fallback)
    assert [f["name"] for f in net["factors"] if f["granularity"] == "layer"] == ["segment.0", "segment.1",
                                                                                  "segment.2"]
    patch = next(r for r in res["runs"] if r["part"] == "input")
    assert len(patch["factors"]) == 4 and res["patch_grid"]["rows"] == 2
    for name in ("results.csv", "vuln_layer.png", "vuln_module.png", "vuln_bit.png", "vuln_patch.png",
                 "accuracy_vs_ber.png"):
        assert (out_dir / name).stat().st_size > 0
    rows = (out_dir / "results.csv").read_text().splitlines()
    assert rows[0].startswith("model,part,granularity,component,ber")
    assert len(rows) == 1 + sum(len(r["factors"]) for r in res["runs"])


@pytest.mark.parametrize("argv,message", [
    (["--ber", "1e-8", "--target-loss", "0.1"], "give either --ber or --target-loss"),
    ([], "give either --ber or --target-loss"),
    (["--target-loss", "1.5"], "target loss must be in (0, 1)"),
    (["--ber", "1e-8", "-g", "patch", "--data", "missing.npz"], "data file not found"),
])
def test_cli_vuln_user_errors(cnn_files, capsys, argv, message):
    code, out, err = run(["vuln", str(cnn_files / "cnn.onnx"), "--data", str(cnn_files / "cnn.npz"), *argv], capsys)
    assert code == 1 and err.strip().startswith("onnxft: error:") and message in err
    assert len(err.strip().splitlines()) == 1


def test_cli_vuln_bad_granularity(cnn_files, capsys):
    code, _, err = run(["vuln", str(cnn_files / "cnn.onnx"), "-g", "layers", "--ber", "1e-8"], capsys)
    assert code == 2 and "granularity" in err


def test_running_only_the_changed_items_equals_a_full_run():
    m = tiny_transformer()
    x, y = labelled_data(m, 48)
    camp = Campaign(InjectionSession(inject(m).model, "cpu"), Dataset({"x": x}, y), batch=48, seed=5)
    faults = camp.faults(0, 0, 1e-4, None)
    base = camp._run(0, faults)
    assert 0 < base.sum() < 48
    for items in ([3], [0, 7, 40], list(range(0, 48, 5))):
        removed = np.isin(faults.item, items)
        full = camp._run(0, Faults(*(getattr(faults, k)[~removed] for k in ("site", "item", "element", "step", "bit"))))
        runs = camp.runs
        assert np.array_equal(camp.run_changed(0, faults, removed, base), full)
        assert camp.runs == runs + 1
    assert {k[0][1][0] for k in camp.sess._sessions} == {48, 16}  # one smaller batch shape


def test_model_granularity_gives_the_unprotected_accuracy(cnn_files):
    from onnxft import api

    res = api.vuln(str(cnn_files / "cnn.onnx"), str(cnn_files / "cnn.npz"), ["model"], ber=1e-3, trials=2,
                   batch=12, provider="cpu")
    (run,) = res["runs"]
    assert run["factors"] == [] and run["trials"] == 2 and run["n"] == 48
    assert res["clean"] == 1.0 and run["accuracy"] < 1.0 and run["faults_per_item"] > 0
