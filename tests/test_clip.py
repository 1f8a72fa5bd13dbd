"""Clipped activations (passes.clip) and their thresholds (campaigns.train_clip): semantics of each
mode with NaN and +-Inf, site finding, progressive training, frozen layers, fault-free identity
inside the bounds, and the hardened graph on stock onnxruntime without onnxft."""
from __future__ import annotations


import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from models import labelled_data, run_cli, run_on_stock_onnxruntime, tiny_cnn, tiny_transformer
from onnxft.campaigns import train_clip
from onnxft.campaigns.harden import HardenOptions, harden
from onnxft.campaigns.train_clip import ClipTrainOptions, clip_thresholds, profile_activations
from onnxft.passes.clip import (ClipError, clip_activations, find_clip_sites, threshold_shape)
from onnxft.runtime.data import Dataset


def run(model, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)[0]


def identity_model(shape, opset=17):
    """x -> Identity -> y: a tensor the clip can take any value on (NaN, +-Inf, negatives)."""
    g = h.make_graph([h.make_node("Identity", ["x"], ["y"], name="act")], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, shape)], [h.make_tensor_value_info("y", T.FLOAT, shape)])
    return h.make_model(g, opset_imports=[h.make_opsetid("", opset)], ir_version=8)


def expected(x, lo, hi, mode):
    inside = (x >= lo) & (x <= hi)  # False for NaN
    if mode == "zero":
        return np.where(inside, x, 0.0).astype(np.float32)
    return np.where(np.isnan(x), 0.0, np.minimum(np.maximum(x, lo), hi)).astype(np.float32)


SPECIAL = [np.nan, np.inf, -np.inf, -1.0, 0.0, 0.5, 1.0, 2.5, 3.0, 1e30]


@pytest.mark.parametrize("mode", ["zero", "clamp"])
@pytest.mark.parametrize("granularity", ["layer", "neuron"])
def test_clip_semantics_with_nan_and_inf(mode, granularity):
    """Rank 2 (features on the last axis) and rank 4 (channels on axis 1), against numpy."""
    rng = np.random.default_rng(0)
    for shape in ([4, 3], [2, 3, 2, 2]):
        m = identity_model(["batch", *shape[1:]])
        tshape = threshold_shape(tuple(shape), granularity)
        hi = np.array(1.5, np.float32) if granularity == "layer" else np.array([0.5, 1.0, 2.5], np.float32).reshape(tshape)
        r = clip_activations(m, {"y": hi}, mode)
        onnx.checker.check_model(r.model, full_check=True)
        x = rng.choice(np.array(SPECIAL, np.float32), size=shape).astype(np.float32)
        x.flat[:4] = [np.nan, np.inf, -np.inf, 1e30]
        got = run(r.model, {"x": x})
        np.testing.assert_array_equal(got, expected(x, 0.0, hi, mode))
        assert not np.isnan(got).any() and np.isfinite(got).all()
        assert r.details["thresholds"] == hi.size and r.details["layers"][0]["shape"] == list(tshape)
        assert m.graph.node[0].output[0] == "y"  # the input model is untouched


def test_threshold_shape():
    assert threshold_shape((8, 16, 5, 5), "layer") == ()
    assert threshold_shape((8, 16, 5, 5), "neuron") == (16, 1, 1)  # NCHW: channel axis 1
    assert threshold_shape((8, 50, 512), "neuron") == (512,)  # transformer: features, last axis
    assert threshold_shape((8, 10), "neuron") == (10,)
    with pytest.raises(ClipError):
        threshold_shape((8,), "neuron")


def test_find_sites_relu_gelu_silu_hardswish():
    assert [s.kind for s in find_clip_sites(tiny_cnn())] == ["relu", "relu"]
    sites = find_clip_sites(tiny_transformer())
    assert [s.kind for s in sites] == ["gelu"] and sites[0].tensor == "g4" and sites[0].low < -0.17
    nodes = [h.make_node("Sigmoid", ["x"], ["s"]), h.make_node("Mul", ["s", "x"], ["silu"]),
             h.make_node("HardSwish", ["silu"], ["hs"]), h.make_node("LeakyRelu", ["hs"], ["y"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [2, 3])],
                     [h.make_tensor_value_info("y", T.FLOAT, [2, 3])])
    sites = find_clip_sites(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8))
    assert [(s.tensor, s.kind) for s in sites] == [("silu", "silu"), ("hs", "hardswish")]
    assert any("LeakyRelu" in why for _, why in sites.skipped)


def test_bad_thresholds_and_opset():
    m = identity_model([2, 3])
    with pytest.raises(ClipError, match="finite"):
        clip_activations(m, {"y": np.nan}, "zero")
    with pytest.raises(ClipError, match="mode"):
        clip_activations(m, {"y": 1.0}, "wrap")
    with pytest.raises(ClipError, match="opset"):
        clip_activations(identity_model([2, 3], opset=10), {"y": 1.0}, "zero")


def _data(model, n=64):
    x, y = labelled_data(model, n)
    return Dataset({"x": x}, y)


class _Spy(train_clip._Trainable):
    made: list = []

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        _Spy.made.append(self)


def test_progressive_training_lowers_objective_layer_by_layer_and_freezes_others(monkeypatch):
    model = tiny_cnn()
    _Spy.made = []
    monkeypatch.setattr(train_clip, "_Trainable", _Spy)
    r = clip_thresholds(model, _data(model), ClipTrainOptions(method="proact", epochs=4, batch=32, penalty=0.1))
    blocks = r.report["blocks"]
    assert len(blocks) == 2 and [len(b["block"]) for b in blocks] == [1, 1]
    # each layer starts where the previous one ended, never ends higher, and the whole run gains
    for a, b in zip(blocks, blocks[1:]):
        assert b["start_objective"] == pytest.approx(a["end_objective"], rel=1e-9)
    assert all(b["end_objective"] <= b["start_objective"] for b in blocks)
    assert blocks[-1]["end_objective"] < blocks[0]["start_objective"]
    # one layer at a time: each trained graph takes exactly one threshold as input, the frozen
    # ones are constants of that graph, and the graph is cut after the layers before it
    assert [net.names for net in _Spy.made] == [b["block"] for b in blocks]
    for net in _Spy.made:
        fed = {i.name for i in net.sess.get_inputs()}
        assert set(net.names) <= fed and not any(n.endswith("clip_hi") for n in fed - set(net.names))
        assert net.cut
    first = r.report["layers"][0]
    assert first["count"] == 1 and r.report["layers"][1]["count"] == 6  # hybrid: neuron-wise last layer
    prof = profile_activations(model, find_clip_sites(model), _data(model))
    t_first = float(r.thresholds[first["tensor"]])
    assert 0 < t_first <= prof[first["tensor"]]["max"] * (1 + 1e-6)


def test_frozen_thresholds_are_the_ones_trained(monkeypatch):
    """Record the threshold fed for the trained layer in every run: a frozen layer's value in the
    later block's graph equals what its own block ended with."""
    model = tiny_cnn()
    seen = []
    orig = train_clip._Trainable.loss

    def spy(self, t, items=None):
        seen.append((tuple(self.names), {k: np.array(v) for k, v in t.items()}))
        return orig(self, t, items)

    monkeypatch.setattr(train_clip._Trainable, "loss", spy)
    r = clip_thresholds(model, _data(model), ClipTrainOptions(method="proact", epochs=3, batch=32, penalty=0.2))
    names = [b["block"][0] for b in r.report["blocks"]]
    # during block 2, the dict passed holds layer 1's threshold: constant, equal to the final one
    during_second = [t[names[0]] for block, t in seen if block == (names[1],)]
    assert during_second and all(np.array_equal(v, during_second[0]) for v in during_second)
    final_first = r.thresholds[r.report["layers"][0]["tensor"]]
    np.testing.assert_allclose(during_second[0], final_first, rtol=1e-12)


@pytest.mark.parametrize("method", ["proact", "layer", "neuron", "ranger"])
def test_fault_free_outputs_inside_bounds_unchanged(method):
    model = tiny_cnn()
    data = _data(model, 64)
    r = clip_thresholds(model, data, ClipTrainOptions(method=method, epochs=2, batch=32, penalty=0.3))
    onnx.checker.check_model(r.model, full_check=True)
    x = np.random.default_rng(7).standard_normal((64, 1, 8, 8)).astype(np.float32)
    prof_sess = ort.InferenceSession(
        train_clip._with_outputs(model, list(r.thresholds)).SerializeToString(), providers=["CPUExecutionProvider"])
    acts = prof_sess.run(list(r.thresholds), {"x": x})
    inside = np.ones(len(x), bool)
    for (t, hi), a in zip(r.thresholds.items(), acts):
        inside &= (a <= np.asarray(hi, np.float32)).reshape(len(x), -1).all(axis=1)
    assert inside.any()
    np.testing.assert_array_equal(run(r.model, {"x": x[inside]}), run(model, {"x": x[inside]}))
    if method == "ranger":  # bounds are the profiled maxima: the training items are all inside
        np.testing.assert_array_equal(run(r.model, {"x": data.inputs["x"]}), run(model, {"x": data.inputs["x"]}))


def test_harden_with_clip_and_abft_runs_on_stock_onnxruntime(tmp_path):
    model = tiny_transformer()
    data = _data(model, 48)
    opts = HardenOptions(abft="lb", range_mode="clamp", clip=ClipTrainOptions(method="proact", epochs=2, batch=16))
    res = harden(model, opts, data, train=data)
    clip = res.plan["clip"]
    assert clip["method"] == "proact" and clip["thresholds"] == 16 and clip["bytes"] == 64
    assert [layer["kind"] for layer in clip["layers"]] == ["gelu"] and clip["train_seconds"] > 0
    assert res.plan["gemms"] and all(r["kind"] != "gelu" for r in res.plan["ranges"])  # GELU left to the clip
    onnx.checker.check_model(res.model, full_check=True)
    x = data.inputs["x"][:8]
    want = run(res.model, {"x": x})
    np.testing.assert_allclose(run_on_stock_onnxruntime(res.model, {"x": x}, tmp_path), want, rtol=1e-5, atol=1e-6)


def test_training_needs_labels():
    model = tiny_cnn()
    x, _ = labelled_data(model, 16)
    with pytest.raises(ClipError, match="labelled"):
        clip_thresholds(model, Dataset({"x": x}, None), ClipTrainOptions(method="layer"))
    assert clip_thresholds(model, Dataset({"x": x}, None), ClipTrainOptions(method="ranger")).report["thresholds"] == 2


def test_cli_harden_clip_ranger_on_sample(tmp_path, capsys):
    out = tmp_path / "r.onnx"
    code, stdout, err = run_cli(["harden", "resnet", "--clip", "ranger", "--abft", "none", "--range", "none",
                                 "--train-limit", "64", "-o", str(out)], capsys)
    assert code == 0, err
    assert "clip ranger (clamp): 19 thresholds (76 bytes)" in stdout
    import json
    plan = json.loads((tmp_path / "r.plan.json").read_text())
    assert plan["clip"]["thresholds"] == 19 and len(plan["clip"]["layers"]) == 19
    assert plan["clip"]["train_items"] == 64
    code, _, err = run_cli(["harden", "resnet", "--clip", "layer", "--abft", "none", "--range", "none",
                            "--train", str(tmp_path / "missing.npz"), "-o", str(out)], capsys)
    assert code != 0 and "onnxft: error:" in err and "Traceback" not in err


def test_bundled_training_subset_is_distinct_from_test_data():
    from onnxft import samples

    info = samples.manifest()
    with np.load(info["train_dataset"]["path"]) as tr, np.load(info["dataset"]["path"]) as te:
        assert tr["x"].shape == (2000, 1, 28, 28) and tr["y"].dtype == np.int64
        assert set(np.unique(tr["y"])) == set(range(10))
        test_rows = {row.tobytes() for row in te["x"].reshape(len(te["x"]), -1)}
        assert not any(row.tobytes() in test_rows for row in tr["x"].reshape(len(tr["x"]), -1))


def test_compare_clip_schemes_same_sites_and_info():
    from onnxft.campaigns.compare import compare
    from onnxft.campaigns.spec import CampaignSpec

    model = tiny_cnn()
    data = _data(model, 48)
    spec = CampaignSpec(schemes=("none", "clip-ranger", "clip-layer", "clip-neuron", "proact"), bers=(1e-3,),
                        trials=1, batch=48, provider="cpu")
    out = compare(model, data, spec, calib=data, train=data, clip_options=ClipTrainOptions(epochs=1, batch=24))
    rows = {r["scheme"]: r for r in out["schemes"]}
    counts = {s: rows[s]["info"]["clip"]["thresholds"] for s in rows if s != "none"}
    assert counts == {"clip-ranger": 2, "clip-layer": 2, "clip-neuron": 10, "proact": 7}
    assert rows["clip-ranger"]["clean"] == rows["none"]["clean"]  # profiled maxima: the data is all inside
    assert all(0 < p["overhead_ops"] for s in counts for p in rows[s]["points"])


@pytest.mark.parametrize("mode", ["zero", "clamp"])
@pytest.mark.parametrize("kind", ["gelu", "silu", "hardswish"])
def test_clip_semantics_below_zero_lower_bound(mode, kind):
    """GELU, SiLU and HardSwish dip below 0: values in [low, 0) are kept, below low (and -Inf)
    become 0 (zero) or low (clamp); NaN gives 0 in both modes."""
    from onnxft.passes.clip import KNOWN_MIN, ClipSite

    low = KNOWN_MIN[kind] * 1.02
    site = ClipSite("y", kind, ("act",), low)
    r = clip_activations(identity_model(["batch", 4]), {"y": 2.0}, mode, [site])
    assert r.details["layers"][0]["kind"] == kind and r.details["layers"][0]["low"] <= low
    x = np.array([[KNOWN_MIN[kind], 0.99 * low, 1.5 * low, -np.inf],
                  [np.nan, 1.9, 2.1, np.inf]], np.float32)
    got = run(r.model, {"x": x})
    lo32 = np.float32(r.details["layers"][0]["low"])
    want = expected(x, lo32, np.float32(2.0), mode)
    np.testing.assert_array_equal(got, want)
    assert got[0, 0] == x[0, 0] and got[0, 1] == x[0, 1]  # the function's own minimum is never clipped
    assert got[1, 0] == 0 and (got[0, 2] == 0 if mode == "zero" else got[0, 2] == lo32)


@pytest.mark.parametrize("method,mode", [("neuron", "clamp"), ("proact", "zero")])
def test_clipped_cnn_runs_on_stock_onnxruntime(tmp_path, method, mode):
    """Channel-wise thresholds on NCHW activations ([C, 1, 1] initializers) on stock onnxruntime,
    onnxft unimportable; faulty values (NaN, huge) in the input reach the clip as NaN/Inf."""
    model = tiny_cnn()
    data = _data(model, 32)
    r = clip_thresholds(model, data, ClipTrainOptions(method=method, mode=mode, epochs=1, batch=16))
    assert any(layer["shape"][1:] == [1, 1] for layer in r.report["layers"])
    onnx.checker.check_model(r.model, full_check=True)
    x = data.inputs["x"][:4].copy()
    x[0, 0, 0, 0], x[1, 0, 0, 0] = np.nan, 1e38
    want = run(r.model, {"x": x})
    np.testing.assert_array_equal(run_on_stock_onnxruntime(r.model, {"x": x}, tmp_path, level="basic"), want)
    assert np.isfinite(want).all()  # the NaN and the huge value are cut at the first clip
    # with every graph optimisation too; the item whose input is NaN may take another (finite)
    # value there: onnxruntime fuses Conv+Relu into one NCHWc kernel, which treats NaN its own way
    # before the clip sees it
    full = run_on_stock_onnxruntime(r.model, {"x": x}, tmp_path, level="all")
    assert np.isfinite(full).all()
    np.testing.assert_allclose(full[1:], want[1:], rtol=1e-5, atol=1e-6)
