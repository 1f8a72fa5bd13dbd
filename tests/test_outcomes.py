"""Outcomes (campaigns.outcomes): masked / SDC / DUE per item in every campaign, checked outputs,
SDC criteria and hooks, labels; and the campaign spec (campaigns.spec) stored with the results."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxft.api as ft
from models import run_cli
from onnxft.campaigns.outcomes import DUE, MASKED, SDC, Judge, OutcomeError, OutcomeOptions, outcome_options
from onnxft.campaigns.spec import CampaignSpec
from onnxft.metrics.detection import box_sdc, boxes_match
from onnxft.passes.inject import SiteSelection
from onnxft.runtime.data import DataError, class_ids, input_specs, load_npz


def passthrough_model() -> onnx.ModelProto:
    """Outputs (ids int64 passthrough, a [B, 4] = x * 1, b [B, 5] = x @ W): ``a`` holds the inputs'
    values in [1.2, 1.8], where a flip of bit 30 gives Inf or NaN (exponent all ones)."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array(np.ones(4, np.float32), "one"),
             nh.from_array(rng.standard_normal((4, 5)).astype(np.float32), "w")]
    nodes = [h.make_node("Identity", ["ids"], ["ids_out"], name="pass"),
             h.make_node("Mul", ["x", "one"], ["a"], name="scale"),
             h.make_node("MatMul", ["x", "w"], ["b"], name="proj")]
    g = h.make_graph(nodes, "passthrough",
                     [h.make_tensor_value_info("x", T.FLOAT, ["batch", 4]),
                      h.make_tensor_value_info("ids", T.INT64, ["batch", 3])],
                     [h.make_tensor_value_info("ids_out", T.INT64, ["batch", 3]),
                      h.make_tensor_value_info("a", T.FLOAT, ["batch", 4]),
                      h.make_tensor_value_info("b", T.FLOAT, ["batch", 5])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def box_model() -> onnx.ModelProto:
    """boxes [B, 3, 4] = x * 1 (a stand-in detector head)."""
    g = h.make_graph([h.make_node("Mul", ["x", "one"], ["boxes"], name="head")], "boxes",
                     [h.make_tensor_value_info("x", T.FLOAT, ["batch", 3, 4])],
                     [h.make_tensor_value_info("boxes", T.FLOAT, ["batch", 3, 4])],
                     [nh.from_array(np.ones(4, np.float32), "one")])
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("outcomes")
    rng = np.random.default_rng(1)
    n = 96
    x = rng.uniform(1.2, 1.8, (n, 4)).astype(np.float32)
    ids = rng.integers(0, 100, (n, 3)).astype(np.int64)
    y = np.argmax(x, axis=1)
    onnx.save(passthrough_model(), d / "m.onnx")
    np.savez(d / "ids.npz", x=x, ids=ids, y=y)
    np.savez(d / "onehot.npz", x=x, ids=ids, y=np.eye(4, dtype=np.float32)[y])
    np.savez(d / "soft.npz", x=x, ids=ids, y=np.full((n, 4), 0.25, np.float32))
    np.savez(d / "nolabels.npz", x=x, ids=ids)
    corners = rng.uniform(0, 10, (n, 3, 2)).astype(np.float32)
    boxes = np.concatenate([corners, corners + rng.uniform(2, 6, (n, 3, 2)).astype(np.float32)], axis=2)
    onnx.save(box_model(), d / "boxes.onnx")
    np.savez(d / "boxes.npz", x=boxes)
    return d


# ----- the classification itself ----------------------------------------------------------------------

def _judge(clean, options=None, names=None):
    names = names or [f"o{i}" for i in range(len(clean))]
    return Judge(names, clean, options)


def test_nan_and_inf_rows_are_due_and_never_correct():
    clean = [np.array([[5.0, 1.0, 0.0], [0.0, 5.0, 1.0], [5.0, 0.0, 1.0], [1.0, 0.0, 5.0]], np.float32)]
    faulty = [clean[0].copy()]
    faulty[0][0, 1] = np.nan  # argmax of this row is 1 (the NaN); label 0 ...
    faulty[0][2] = np.nan  # ... and of this all-NaN row 0 = its label: the old top-1 counted it correct
    faulty[0][3, 0] = np.inf
    labels = np.array([0, 1, 0, 2])
    j = _judge(clean)
    assert j.criterion == "top1"  # one [batch, C] output: a classifier
    np.testing.assert_array_equal(j.classify(faulty, clean, labels), [DUE, MASKED, DUE, DUE])
    np.testing.assert_array_equal(j.correct(faulty, labels, clean), [False, True, False, False])
    np.testing.assert_array_equal(j.correct(clean, labels), [True, True, True, True])


def test_due_counts_only_elements_finite_in_the_clean_run():
    clean = [np.array([[1.0, -np.inf], [1.0, 2.0]], np.float32)]
    faulty = [np.array([[1.0, -np.inf], [1.0, np.inf]], np.float32)]
    np.testing.assert_array_equal(_judge(clean, OutcomeOptions(sdc="tol")).classify(faulty, clean), [MASKED, DUE])


@pytest.mark.parametrize("criterion", ["tol", "cosine", "top1"])
def test_a_signalling_nan_is_due_without_numpy_warnings(criterion):
    """A flipped bit can clear a NaN's quiet bit (0x7f800001): casting such a value is an "invalid"
    operation, which numpy reported as a RuntimeWarning in every eval of a real model that met one."""
    import warnings

    clean = [np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], np.float32)]
    faulty = [clean[0].copy()]
    faulty[0][0, 1] = np.array([0x7F800001], np.uint32).view(np.float32)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = _judge(clean, outcome_options(sdc=criterion)).classify(faulty, clean)
    np.testing.assert_array_equal(out, [DUE, MASKED])


def test_tol_cosine_and_top1_criteria():
    clean = [np.array([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], np.float32)]
    faulty = [np.array([[1.0, 2.0, 3.000001], [2.0, 4.0, 6.0], [1.0, 2.0, 3.5]], np.float32)]
    tol = _judge(clean, outcome_options(sdc="tol", tol="rel=1e-3,abs=1e-5"))
    np.testing.assert_array_equal(tol.classify(faulty, clean), [MASKED, SDC, SDC])
    loose = _judge(clean, outcome_options(sdc="tol", tol="rel=0.5"))
    np.testing.assert_array_equal(loose.classify(faulty, clean), [MASKED, SDC, MASKED])
    cos = _judge(clean, outcome_options(sdc="cosine", tol="cos=0.999"))  # a scaled vector is the same direction
    np.testing.assert_array_equal(cos.classify(faulty, clean), [MASKED, MASKED, SDC])
    top1 = _judge(clean, outcome_options(sdc="top1"))
    np.testing.assert_array_equal(top1.classify(faulty, clean), [MASKED, MASKED, MASKED])


def test_top1_is_per_position_along_the_last_axis():
    clean = [np.array([[[3.0, 1.0], [1.0, 3.0]]] * 2, np.float32)]  # [items, tokens, classes]
    faulty = [clean[0].copy()]
    faulty[0][1, 1] = [3.0, 1.0]  # item 1, token 1 changes class
    j = _judge(clean, OutcomeOptions(sdc="top1"))
    np.testing.assert_array_equal(j.classify(faulty, clean), [MASKED, SDC])
    assert _judge(clean).criterion == "tol"  # not [batch, C]: not a classifier
    with pytest.raises(OutcomeError, match="no class axis"):
        _judge([np.zeros((4, 1), np.float32)], OutcomeOptions(sdc="top1"))


def test_hook_bools_scores_and_the_box_detector():
    clean = {"boxes": np.array([[[0, 0, 10, 10], [20, 20, 30, 30]]] * 3, np.float32)}
    faulty = {"boxes": clean["boxes"].copy()}
    faulty["boxes"][1, 0] += 2  # IoU 0.47 with its clean box: a moved box
    faulty["boxes"][2, 1] += 1  # IoU 0.82: still the same detection
    np.testing.assert_array_equal(box_sdc(faulty, clean), [False, True, False])
    assert boxes_match(np.zeros((0, 4)), np.zeros((0, 4))) and not boxes_match(np.zeros((1, 4)), np.zeros((0, 4)))
    j = Judge(["boxes"], [clean["boxes"]], OutcomeOptions(sdc="onnxft.metrics.detection:box_sdc"))
    np.testing.assert_array_equal(j.classify([faulty["boxes"]], [clean["boxes"]]), [MASKED, SDC, MASKED])
    scores = Judge(["o"], [np.zeros((3, 2), np.float32)], OutcomeOptions(sdc="test_outcomes:_score_hook", score=0.5))
    np.testing.assert_array_equal(scores.classify([np.zeros((3, 2), np.float32)] * 1, [np.zeros((3, 2))]),
                                  [MASKED, SDC, MASKED])
    with pytest.raises(OutcomeError, match="cannot load"):
        Judge(["o"], [np.zeros((3, 2))], OutcomeOptions(sdc="no_such_module:f"))


def test_hook_module_in_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "onnxft_test_cwd_hook.py").write_text(
        "import numpy as np\n\ndef every_item(faulty, clean, labels):\n    return np.ones(len(clean['o']), bool)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    j = Judge(["o"], [np.zeros((2, 3), np.float32)], OutcomeOptions(sdc="onnxft_test_cwd_hook:every_item"))
    np.testing.assert_array_equal(j.classify([np.zeros((2, 3))], [np.zeros((2, 3))]), [SDC, SDC])


def _score_hook(faulty, clean, labels):
    return np.array([1.0, 0.2, 0.5])


def test_checked_outputs_default_selection_and_errors():
    clean = [np.zeros((4, 3), np.int64), np.zeros((4, 2), np.float32), np.zeros((4, 5), np.float32),
             np.zeros((), np.float32)]
    names = ["ids", "a", "b", "scalar"]
    j = Judge(names, clean)
    assert j.names == ["a", "b"] and j.criterion == "tol"
    assert {d["name"]: d["reason"] for d in j.ignored} == {"ids": "int64: passthrough", "scalar": "no batch axis"}
    only_b = Judge(names, clean, OutcomeOptions(outputs=("b",)))
    assert only_b.names == ["b"] and only_b.criterion == "top1"
    with pytest.raises(OutcomeError, match="unknown output"):
        Judge(names, clean, OutcomeOptions(outputs=("nope",)))
    with pytest.raises(OutcomeError, match="passthrough"):
        Judge(names, clean, OutcomeOptions(outputs=("ids",)))
    with pytest.raises(OutcomeError, match="--tol"):
        outcome_options(tol="rel=x")


def test_labels_class_ids_or_one_hot(files):
    np.testing.assert_array_equal(class_ids(np.array([[0, 1, 0], [1, 0, 0]], np.float32)), [1, 0])
    np.testing.assert_array_equal(class_ids(np.array([[2], [0]])), [2, 0])
    for bad in (np.full((2, 3), 1 / 3), np.zeros((2, 2, 2)), np.array([0.5, 1.0]), np.array([-1, 0])):
        with pytest.raises(DataError):
            class_ids(bad)
    specs = input_specs(passthrough_model())
    ids = load_npz(files / "ids.npz", specs)
    onehot = load_npz(files / "onehot.npz", specs)
    np.testing.assert_array_equal(ids.labels, onehot.labels)


# ----- campaigns end to end ----------------------------------------------------------------------------

def test_eval_counts_due_never_correct_and_ber0_is_exactly_clean(files):
    r = ft.evaluate(str(files / "m.onnx"), str(files / "ids.npz"), bers=[0.0, 0.05], trials=2, batch=32,
                    provider="cpu", outputs=["a"])
    p0, p1 = r.points
    assert r.outputs["checked"] == ["a"] and r.outputs["sdc_criterion"] == "top1"
    assert {d["name"] for d in r.outputs["ignored"]} == {"ids_out", "b"}
    assert p0.sdc == 0.0 and p0.due == 0.0 and p0.masked == 1.0 and p0.value == r.clean == 1.0
    assert p1.due > 0.05, "bit-30 flips of values in [1, 2) must give NaN/Inf rows"
    assert abs(p1.sdc + p1.due + p1.masked - 1.0) < 1e-12
    assert p1.value <= 1.0 - p1.due + 1e-12  # a DUE item is never correct
    assert p1.due_ci[0] <= p1.due <= p1.due_ci[1] and p1.sdc_ci[0] <= p1.sdc <= p1.sdc_ci[1]
    sdc = ft.evaluate(str(files / "m.onnx"), str(files / "nolabels.npz"), bers=[0.0, 0.05], trials=2, batch=32,
                      provider="cpu", metric="sdc", outputs="a")
    assert [p.value for p in sdc.points] == [p.sdc for p in r.points]  # same seeds, same outcomes
    assert [p.due for p in sdc.points] == [p.due for p in r.points]
    one_hot = ft.evaluate(str(files / "m.onnx"), str(files / "onehot.npz"), bers=[0.0, 0.05], trials=2, batch=32,
                          provider="cpu", outputs=["a"])
    assert [p.value for p in one_hot.points] == [p.value for p in r.points]


def test_default_checks_every_float_output_and_ignores_the_passthrough(files):
    r = ft.evaluate(str(files / "m.onnx"), str(files / "nolabels.npz"), bers=[0.0, 1e-3], trials=1, batch=32,
                    provider="cpu", metric="sdc", sdc="tol", tol="rel=0,abs=0")
    assert r.outputs["checked"] == ["a", "b"]
    assert r.outputs["ignored"] == [{"name": "ids_out", "reason": "int64: passthrough"}]
    assert r.points[0].sdc == r.points[0].due == 0.0
    assert r.points[1].sdc + r.points[1].due > 0 and r.points[1].faults_per_item > 0


def test_hook_criterion_in_a_campaign(files):
    kw = dict(bers=[0.0, 2e-3], trials=2, batch=32, provider="cpu", metric="sdc")
    box = ft.evaluate(str(files / "boxes.onnx"), str(files / "boxes.npz"), sdc="onnxft.metrics.detection:box_sdc",
                      **kw)
    exact = ft.evaluate(str(files / "boxes.onnx"), str(files / "boxes.npz"), sdc="tol", tol="rel=0,abs=0", **kw)
    assert box.outputs["sdc_criterion"] == "onnxft.metrics.detection:box_sdc"
    assert box.points[0].sdc == 0.0 and box.points[0].due == 0.0
    assert 0 < box.points[1].sdc < exact.points[1].sdc  # low-bit flips move a box less than IoU 0.5
    assert box.points[1].due == exact.points[1].due


def test_cli_results_json_csv_plots_spec_and_fault_log(files, capsys, tmp_path):
    out_dir = tmp_path / "res"
    log = tmp_path / "log.jsonl"
    code, out, _ = run_cli(["eval", str(files / "m.onnx"), "--data", str(files / "ids.npz"), "--ber", "0,0.05",
                            "--trials", "1", "--batch", "32", "--quiet", "--output", "a", "--provider", "cpu",
                            "--out", str(out_dir), "--fault-log", str(log)], capsys)
    assert code == 0 and "DUE" in out and "ignored: ids_out (int64: passthrough)" in out
    res = json.loads((out_dir / "results.json").read_text())
    for p in res["points"]:
        assert {"sdc", "due", "masked", "sdc_ci", "due_ci", "value", "ci"} <= set(p)
    spec = CampaignSpec.from_json(res["spec"])
    assert spec.outcome.outputs == ("a",) and spec.bers == (0.0, 0.05) and spec.batch == 32
    header = (out_dir / "results.csv").read_text().splitlines()[0].split(",")
    assert {"sdc", "due", "masked", "sdc_ci_low", "due_ci_high"} <= set(header)
    assert (out_dir / "outcomes_vs_ber.png").read_bytes()[:4] == b"\x89PNG"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert all(len(r["outcomes"]) == r["stop"] - r["start"] for r in records)
    assert set(records[0]["outcomes"]) == {MASKED}  # BER 0
    faulty = [c for r in records if r["ber"] > 0 for c in r["outcomes"]]
    assert res["points"][1]["due"] == faulty.count(DUE) / len(faulty)


@pytest.mark.parametrize("argv, message", [
    (["--output", "nope"], "unknown output(s) nope"),
    (["--output", "ids_out"], "passthrough"),
    (["--sdc", "weird"], "unknown --sdc"),
    (["--tol", "rel=1,bogus=2"], "unknown key"),
])
def test_cli_outcome_mistakes_are_one_line(files, capsys, argv, message):
    code, _, err = run_cli(["eval", str(files / "m.onnx"), "--data", str(files / "ids.npz"), "--ber", "0",
                            "--trials", "1", "--quiet", "--provider", "cpu"] + argv, capsys)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1


def test_cli_soft_labels_are_one_line(files, capsys):
    code, _, err = run_cli(["eval", str(files / "m.onnx"), "--data", str(files / "soft.npz"), "--ber", "0",
                            "--trials", "1", "--quiet"], capsys)
    assert code == 1 and "not one-hot" in err and len(err.strip().splitlines()) == 1


def test_vuln_scores_the_chosen_output_and_reports_due(files):
    res = ft.vuln(str(files / "m.onnx"), str(files / "ids.npz"), ["model"], ber=0.05, trials=1, max_trials=1,
                  batch=32, provider="cpu", outputs=["a"])
    run = res["runs"][0]
    assert res["outputs"]["checked"] == ["a"] and res["clean"] == 1.0
    assert run["due"] > 0 and run["accuracy"] <= 1 - run["due"] + 1e-12
    assert CampaignSpec.from_json(res["spec"]).bers == (0.05,)


def test_wilson_interval_is_exact_at_the_ends():
    from onnxft.campaigns.stats import wilson_interval

    for n in (1, 7, 2000, 123457):
        assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0
        lo, hi = wilson_interval(1, n)
        assert 0.0 < lo <= 1 / n <= hi


# ----- the spec -------------------------------------------------------------------------------------------

def test_spec_json_round_trip_is_exact():
    spec = CampaignSpec(model="m.onnx", model_name="m", data="d.npz", bers=(0.0, 1e-9, 3.3e-7), trials=5, seed=7,
                        metric="sdc", outcome=OutcomeOptions(outputs=("a", "b"), sdc="cosine", rel=0.1, abs=0.2,
                                                             cos=0.95, score=0.7),
                        selection=SiteSelection(op_types=frozenset({"MatMul", "Add"}), names="blocks",
                                                formats=frozenset({"fp32"}), scales=(("attn", 0.0), ("mlp", 2.5)),
                                                include_protection=True),
                        int_widths=(8, 8), provider="cpu", threads=2, batch=17, limit=99, schemes=("none", "lb"),
                        calib="c.npz", design_ber=1e-7, range_mode="zero", range_kinds=("softmax",), alpha=0.25,
                        dmr=("Softmax",), latency=True, target_drop=0.05, max_overhead=0.1,
                        granularity=("layer", "bit"), target_losses=(0.1, 0.2), loss_mode="absolute", max_trials=4,
                        ci_width=0.03, search_trials=2, patch=(4, 4))
    text = json.dumps(spec.to_json())
    assert CampaignSpec.from_json(text) == spec
    assert CampaignSpec.from_json(json.loads(text)) == spec
    assert CampaignSpec.from_json(CampaignSpec().to_json()) == CampaignSpec()
    with pytest.raises(ValueError, match="unknown field"):
        CampaignSpec.from_json({"nope": 1})
