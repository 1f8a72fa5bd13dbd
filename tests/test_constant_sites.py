"""Arithmetic on constants only (weight dequantisation and the like) runs once, when a runtime folds
it at load: it is not an operation-wise fault site unless ``fault_constants`` asks for it."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxft import api
from onnxft.campaigns.spec import CampaignSpec
from onnxft.campaigns.store import CampaignStore, StoreError
from onnxft.faults.sites import SiteTable
from onnxft.graph.constants import constant_tensors, load_time_nodes
from onnxft.passes.inject import InjectError, SiteSelection, inject, selection_from_options
from onnxft.passes.non_sites import CONSTANT
from onnxft.runtime.session import InjectionSession
from tests.models import run_cli
from test_inject_reference import make_model, vi

W_Q = np.array([[3, -7, 12], [-128, 5, 0], [127, 1, -2], [9, -9, 64]], np.int8)
SCALE = np.float32(0.02)


def _dequant_model(scale_is_input: bool = False) -> onnx.ModelProto:
    """An int8 weight dequantised in the graph (Cast + Mul by the scale, as int8 exports do) feeding
    a MatMul, then a bias Add. With ``scale_is_input`` the scale is also a graph input (its
    initializer only a default), so the Mul can be fed and runs per inference."""
    nodes = [h.make_node("Cast", ["w_q"], ["w_f"], name="dequant_cast", to=T.FLOAT),
             h.make_node("Mul", ["w_f", "scale"], ["w"], name="dequant_mul"),
             h.make_node("MatMul", ["x", "w"], ["y0"], name="mm"),
             h.make_node("Add", ["y0", "b"], ["y"], name="bias")]
    inits = [nh.from_array(W_Q, "w_q"), nh.from_array(SCALE, "scale"),
             nh.from_array(np.array([0.5, -1.0, 2.0], np.float32), "b")]
    inputs = [vi("x", T.FLOAT, ["N", 4])] + ([vi("scale", T.FLOAT, [])] if scale_is_input else [])
    return make_model(nodes, inputs, [vi("y", T.FLOAT, ["N", 3])], inits)


def _site_nodes(model, **sel) -> list[str]:
    res = inject(model, SiteSelection(**sel))
    return [s.node for s in SiteTable.from_model(res.model).sites]


def _reasons(model, **sel) -> dict[str, str]:
    return {r["node"]: r["reason"] for r in inject(model, SiteSelection(**sel)).details["non_sites"]}


def test_dequantisation_is_not_a_site_by_default():
    model = _dequant_model()
    assert load_time_nodes(model.graph) == {"w_f", "w"}
    assert _site_nodes(model) == ["mm", "bias"]
    why = _reasons(model)
    assert why["dequant_mul"] == CONSTANT and "--fault-constants" in CONSTANT
    assert why["dequant_cast"] == "data movement"
    assert _site_nodes(model, fault_constants=True) == ["dequant_mul", "mm", "bias"]
    assert "dequant_mul" not in _reasons(model, fault_constants=True)
    # the injection graph still computes the model: fault-free output against numpy
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 7
    out, _ = InjectionSession(inject(model).model, "cpu", threads=1).clean({"x": x})
    want = x @ (W_Q.astype(np.float32) * SCALE) + np.array([0.5, -1.0, 2.0], np.float32)
    np.testing.assert_allclose(out[0], want, rtol=1e-6)


def test_a_graph_input_that_shadows_an_initializer_is_not_constant():
    model = _dequant_model(scale_is_input=True)
    assert "scale" not in constant_tensors(model.graph) and "w_f" in constant_tensors(model.graph)
    assert load_time_nodes(model.graph) == {"w_f"}
    assert _site_nodes(model) == ["dequant_mul", "mm", "bias"]


def _chain_model() -> onnx.ModelProto:
    """Constant -> Mul, through data movement (Reshape of a constant, ConstantOfShape of a constant
    shape), beside a random op's output times a constant, all feeding x's arithmetic."""
    c = lambda name, v: h.make_node("Constant", [], [name], name=name, value=nh.from_array(np.asarray(v)))  # noqa: E731
    nodes = [c("k1", np.float32(3.0)), c("k2", np.array([[2.0, 4.0]], np.float32)), c("shape", np.array([2], np.int64)),
             h.make_node("Mul", ["k1", "k2"], ["k"], name="const_mul"),
             h.make_node("Reshape", ["k", "shape"], ["k_flat"], name="const_reshape"),
             h.make_node("ConstantOfShape", ["shape"], ["ones"], name="ones",
                         value=nh.from_array(np.ones(1, np.float32))),
             h.make_node("Add", ["k_flat", "ones"], ["k_plus"], name="const_add"),
             h.make_node("RandomUniform", [], ["r"], name="random", shape=[2], dtype=T.FLOAT, seed=1.0),
             h.make_node("Mul", ["r", "k1"], ["rk"], name="random_mul"),
             h.make_node("Mul", ["x", "k_plus"], ["xk"], name="x_mul"),
             h.make_node("Add", ["xk", "rk"], ["y"], name="out_add")]
    return make_model(nodes, [vi("x", T.FLOAT, ["N", 2])], [vi("y", T.FLOAT, ["N", 2])])


def test_constant_chains_and_nondeterministic_ops():
    """Constant -> Mul, through data movement: constant; a random op's output is not, whatever its
    inputs."""
    model = _chain_model()
    assert load_time_nodes(model.graph) == {"k1", "k2", "shape", "k", "k_flat", "ones", "k_plus"}
    assert _site_nodes(model) == ["random_mul", "x_mul", "out_add"]
    why = _reasons(model)
    assert why["const_mul"] == why["const_add"] == CONSTANT
    assert _site_nodes(model, fault_constants=True) == ["const_mul", "const_add", "random_mul", "x_mul", "out_add"]


def test_no_sites_error_says_the_arithmetic_is_constant():
    nodes = [h.make_node("Constant", [], ["k"], name="k", value=nh.from_array(np.float32(2.0))),
             h.make_node("Mul", ["k", "k"], ["k2"], name="const_mul"),
             h.make_node("Expand", ["k2", "n"], ["y"], name="expand")]
    model = make_model(nodes, [vi("n", T.INT64, [1])], [vi("y", T.FLOAT, None)])
    with pytest.raises(InjectError, match=r"^no fault sites: 1 arithmetic node\(s\) compute only from constants "
                                          r"\(folded at load.*--fault-constants makes them sites\); other nodes"):
        inject(model)
    assert _site_nodes(model, fault_constants=True) == ["const_mul"]
    with pytest.raises(InjectError, match=r"filtered out all 2 candidate site\(s\).*; 1 arithmetic node\(s\) compute "
                                          r"only from constants"):
        inject(_dequant_model(), selection_from_options(names="^nothing$"))


def test_inspect_reason_and_cli_flag_round_trip(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(_dequant_model(), path)
    info = api.inspect(str(path))
    assert [s["node"] for s in info["sites"]] == ["mm", "bias"]
    assert {r["node"]: r["reason"] for r in info["non_sites"]}["dequant_mul"] == CONSTANT
    code, out, _ = run_cli(["inspect", str(path), "--json", "--fault-constants"], capsys)
    assert code == 0 and [s["node"] for s in json.loads(out)["sites"]] == ["dequant_mul", "mm", "bias"]
    for flag, n in (([], 2), (["--fault-constants"], 3)):
        dest = tmp_path / f"inj{n}.onnx"
        code, out, err = run_cli(["inject", str(path), "-o", str(dest), *flag], capsys)
        assert code == 0, err
        assert f"{n} fault sites" in out
        assert len(SiteTable.from_model(onnx.load(dest)).sites) == n
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32))
    for flag, want in (([], False), (["--fault-constants"], True)):
        out_dir = tmp_path / f"eval{want}"
        code, _, err = run_cli(["eval", str(path), "--data", str(data), "--metric", "sdc", "--ber", "1e-4",
                                "--trials", "1", "--quiet", "--out", str(out_dir), *flag], capsys)
        assert code == 0, err
        spec = json.loads((out_dir / "results.json").read_text())["spec"]
        assert spec["selection"]["fault_constants"] is want


def test_spec_round_trip_and_older_specs_fault_constants(tmp_path):
    spec = CampaignSpec(selection=SiteSelection(fault_constants=True))
    assert CampaignSpec.from_json(json.dumps(spec.to_json())) == spec
    assert CampaignSpec.from_json(CampaignSpec().to_json()).selection.fault_constants is False
    # a spec an older onnxft stored (no such key): that campaign faulted constant arithmetic
    old = CampaignSpec().to_json()
    del old["selection"]["fault_constants"]
    assert CampaignSpec.from_json(old).selection.fault_constants is True
    store = CampaignStore(tmp_path)
    store.register("m", "eval", old)
    store.close()
    with pytest.raises(StoreError, match="differs in: selection.*before --fault-constants existed.*add "
                                         "--fault-constants to resume it"):
        CampaignStore(tmp_path, resume=True).register("m", "eval", CampaignSpec().to_json())
    CampaignStore(tmp_path, resume=True).register("m", "eval", spec.to_json())  # resumes as it ran


@pytest.mark.parametrize("name", ["vit", "vit_int8", "resnet", "resnet_int8"])
def test_bundled_samples_have_no_constant_arithmetic(name):
    """Their sites are what they were before constant arithmetic stopped being sites."""
    model, _, _ = api.load(name)
    res = inject(model)
    assert not [r for r in res.details["non_sites"] if r["reason"] == CONSTANT]
    assert (SiteTable.from_model(res.model).sites
            == SiteTable.from_model(inject(model, SiteSelection(fault_constants=True)).model).sites)


def test_vuln_and_compare_take_the_flag(tmp_path, capsys):
    path, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save(_dequant_model(), path)
    x = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    np.savez(data, x=x, y=np.argmax(x @ (W_Q.astype(np.float32) * SCALE), 1))
    for flag, sites in (([], 2), (["--fault-constants"], 3)):
        code, out, err = run_cli(["vuln", str(path), "--data", str(data), "--ber", "1e-3", "--trials", "1",
                                  "--max-trials", "1", "--batch", "16", "--json", *flag], capsys)
        assert code == 0, err
        res = json.loads(out)
        assert res["sites"] == sites and res["spec"]["selection"]["fault_constants"] is bool(flag)
        code, out, err = run_cli(["compare", str(path), "--data", str(data), "--schemes", "none", "--ber", "1e-3",
                                  "--trials", "1", "--batch", "16", *flag], capsys)
        assert code == 0, err
        assert ("arithmetic on constants faulted too" in out) is bool(flag)


def test_arithmetic_after_a_dequantize_linear_stays_a_site():
    """onnxruntime does not fold DequantizeLinear of a constant (QDQ fusions need it), so a Mul on
    its output runs per inference."""
    nodes = [h.make_node("DequantizeLinear", ["w_q", "scale", "zero"], ["w_d"], name="dq"),
             h.make_node("Mul", ["w_d", "two"], ["w"], name="dq_mul"),
             h.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    inits = [nh.from_array(W_Q, "w_q"), nh.from_array(SCALE, "scale"), nh.from_array(np.int8(0), "zero"),
             nh.from_array(np.float32(2.0), "two")]
    model = make_model(nodes, [vi("x", T.FLOAT, ["N", 4])], [vi("y", T.FLOAT, ["N", 3])], inits)
    assert load_time_nodes(model.graph) == set()
    assert _site_nodes(model) == ["dq_mul", "mm"]


def test_onnxruntime_folds_the_load_time_arithmetic(tmp_path):
    """The reference: onnxruntime's own optimised graph (level basic, as campaigns run) holds none
    of the nodes ``load_time_nodes`` names, and keeps the Mul after a DequantizeLinear."""
    import onnxruntime as ort

    def nodes_left(model):
        path, out = tmp_path / "m.onnx", tmp_path / "m.opt.onnx"
        onnx.save(model, path)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(out)
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return {n.name for n in onnx.load(out).graph.node}

    base = _dequant_model()
    dq = [h.make_node("DequantizeLinear", ["w_q", "scale", "zero"], ["w_d"], name="dq"),
          h.make_node("Mul", ["w_d", "scale"], ["w2"], name="dq_mul"),
          h.make_node("Add", ["y", "w2"], ["z"], name="late_add")]
    model = make_model(list(base.graph.node) + dq, list(base.graph.input), [vi("z", T.FLOAT, ["N", 3])],
                       list(base.graph.initializer) + [nh.from_array(np.int8(0), "zero")])
    load_time = {n.name for n in model.graph.node if n.output[0] in load_time_nodes(model.graph)}
    assert load_time == {"dequant_cast", "dequant_mul"}
    left = nodes_left(model)
    assert not load_time & left
    assert {"dq", "dq_mul", "late_add"} <= left
    chain = _chain_model()
    load_time = {n.name for n in chain.graph.node if n.output[0] in load_time_nodes(chain.graph)}
    left = nodes_left(chain)
    assert not load_time & left
    assert {"random", "random_mul", "x_mul"} <= left


def test_fault_logs_replay_and_older_logs_fault_constants(tmp_path, capsys):
    """A logged trial replays exactly with or without the flag; a log written before the option
    existed (no key) is replayed with constant arithmetic faulted, as it ran."""
    path, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save(_dequant_model(), path)
    np.savez(data, x=np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32))
    for flag in ([], ["--fault-constants"]):
        log = tmp_path / f"log{len(flag)}.jsonl"
        code, _, err = run_cli(["eval", str(path), "--data", str(data), "--metric", "sdc", "--ber", "1e-2",
                                "--trials", "2", "--quiet", "--fault-log", str(log), *flag], capsys)
        assert code == 0, err
        records = [json.loads(line) for line in log.read_text().splitlines()]
        assert all(r["selection"]["fault_constants"] is bool(flag) for r in records)
        sites = {f["site"] for r in records for f in r["faults"]}
        if flag:  # sites dequant_mul, mm, bias: the dequantisation is hit
            assert "s0000" in sites
        else:  # sites mm, bias only
            assert sites <= {"s0000", "s0001"}
        assert all(api.replay(str(log), record=i)["identical"] for i in range(len(records)))
    for r in records:  # the flag's log, as an older onnxft wrote it
        del r["selection"]["fault_constants"]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert all(api.replay(str(log), record=i)["identical"] for i in range(len(records)))
