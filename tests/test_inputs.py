"""Inputs as real models have them (docs/inputs.md): per-input batch axes (scalars fed whole, a state
batched on axis 1), --shape, --batch-axis, shapes from --data, unresolved dims and onnxruntime's
refusals as one line, any dtype; and the --max-faults budget refused before any sampling."""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

import onnxft.api as ft
from models import run_cli
from onnxft.faults.sampling import FaultBudgetError, expected_faults, sample_faults
from onnxft.runtime.data import DataError, Dataset, InputLayout, input_specs, load_npz, synthetic
from onnxft.passes.inject import inject as inject_pass
from onnxft.runtime.session import InjectionSession

W = np.arange(12, dtype=np.float32).reshape(4, 3) / 10


def state_model(named: bool = True) -> onnx.ModelProto:
    """A VAD-like model: x [B, 4], state [2, B, 3] (batched on axis 1), sr a scalar int64.
    y = x @ W + state[0] * sr / 1000 ; stateN = state * 2. ``named=False``: no dim_params (silero's)."""
    b = "batch" if named else None
    nodes = [h.make_node("MatMul", ["x", "w"], ["xw"], name="mm"),
             h.make_node("Gather", ["state", "zero"], ["s0"], axis=0, name="g"),
             h.make_node("Cast", ["sr"], ["srf"], to=T.FLOAT, name="c"),
             h.make_node("Div", ["srf", "k"], ["srk"], name="d"),
             h.make_node("Mul", ["s0", "srk"], ["s0k"], name="m"),
             h.make_node("Add", ["xw", "s0k"], ["y"], name="a"),
             h.make_node("Mul", ["state", "two"], ["stateN"], name="m2")]
    inits = [nh.from_array(W, "w"), nh.from_array(np.array(0, np.int64), "zero"),
             nh.from_array(np.array(1000, np.float32), "k"), nh.from_array(np.array(2, np.float32), "two")]
    g = h.make_graph(nodes, "state", [h.make_tensor_value_info("x", T.FLOAT, [b, 4]),
                                      h.make_tensor_value_info("state", T.FLOAT, [2, b, 3]),
                                      h.make_tensor_value_info("sr", T.INT64, [])],
                     [h.make_tensor_value_info("y", T.FLOAT, [b, 3]),
                      h.make_tensor_value_info("stateN", T.FLOAT, [2, b, 3])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def state_data(n=5, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 4)).astype(np.float32),
            "state": rng.standard_normal((2, n, 3)).astype(np.float32), "sr": np.array(16000, np.int64)}


def state_reference(d):
    return d["x"] @ W + d["state"][0] * np.float32(d["sr"]) / 1000


def seq_model(dtype=T.FLOAT) -> onnx.ModelProto:
    """x [batch, T] (T dynamic, any dtype) -> Cast float -> Mul by 3 -> ReduceSum over T -> y [batch, 1]."""
    nodes = [h.make_node("Cast", ["x"], ["xf"], to=T.FLOAT, name="cast"),
             h.make_node("Mul", ["xf", "three"], ["x3"], name="mul"),
             h.make_node("ReduceSum", ["x3", "axes"], ["y"], keepdims=1, name="sum")]
    inits = [nh.from_array(np.array(3, np.float32), "three"), nh.from_array(np.array([1], np.int64), "axes")]
    g = h.make_graph(nodes, "seq", [h.make_tensor_value_info("x", dtype, ["batch", "T"])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["batch", 1])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("named", [True, False])
def test_batch_axes_inferred(named):
    specs = {s.name: s for s in input_specs(state_model(named))}
    assert (specs["x"].batch_axis, specs["state"].batch_axis, specs["sr"].batch_axis) == (0, 1, None)


def test_dataset_slices_each_input_on_its_axis(tmp_path):
    d = state_data(5)
    np.savez(tmp_path / "d.npz", **d)
    ds = load_npz(tmp_path / "d.npz", input_specs(state_model()))
    assert len(ds) == 5 and ds.batch_axes == {"x": 0, "state": 1, "sr": None}
    b = ds.batch(3, 10)
    assert b.batch_size == 2 and b["x"].shape == (2, 4) and b["state"].shape == (2, 2, 3)
    np.testing.assert_array_equal(b["state"], d["state"][:, 3:5])
    assert b["sr"].shape == () and int(b["sr"]) == 16000  # fed whole
    t = ds.take([4, 0])
    np.testing.assert_array_equal(t["state"], d["state"][:, [4, 0]])
    assert len(ds.head(2)) == 2 and len(ds.tail(1)) == 1
    np.testing.assert_array_equal(ds.tail(1).inputs["state"], d["state"][:, 4:])


def test_state_and_scalar_inputs_run_through_campaigns(tmp_path):
    d = state_data(5)
    m = state_model(named=False)
    ds = Dataset(d, None, None, {"x": 0, "state": 1, "sr": None})
    sess = InjectionSession(inject_pass(m).model, "cpu")
    for s in range(0, 5, 2):  # batches of 2, 2, 1
        feeds = ds.batch(s, s + 2)
        (y, state_n), plans = sess.clean(feeds)
        np.testing.assert_allclose(y, state_reference({k: feeds[k] for k in feeds}), rtol=1e-6)
        np.testing.assert_array_equal(state_n, feeds["state"] * 2)
        assert max(p.items for p in plans) == feeds.batch_size
    # a Dataset built without batch axes takes the model's
    r = ft.evaluate(m, Dataset(d, None), bers=[0.0, 0.3], trials=1, metric="sdc", provider="cpu", batch=2)
    assert r.points[0].value == 0 and r.points[1].value > 0 and r.items == 5


def test_batch_axis_override_and_errors(tmp_path):
    m = state_model()
    specs = {s.name: s for s in input_specs(m, InputLayout(batch_axes={"state": None, "x": -2}))}
    assert specs["state"].batch_axis is None and specs["x"].batch_axis == 0
    with pytest.raises(DataError, match="not an input"):
        input_specs(m, InputLayout(batch_axes={"nope": 0}))
    with pytest.raises(DataError, match="rank 3"):
        input_specs(m, InputLayout(batch_axes={"state": 3}))
    np.savez(tmp_path / "d.npz", **state_data(5))
    with pytest.raises(DataError, match="disagree on the number of items"):  # state on axis 0 holds 2
        load_npz(tmp_path / "d.npz", input_specs(m, InputLayout(batch_axes={"state": 0})))


def test_shape_option_and_unresolved_dim():
    m = seq_model()
    with pytest.raises(DataError, match=r"input 'x' axis 1 \(T\) has no fixed size.*--shape x:B,T"):
        synthetic(input_specs(m), 2)
    feeds = synthetic(input_specs(m, InputLayout(shapes={"x": (1, 7)})), 3)
    assert feeds["x"].shape == (3, 7) and feeds.batch_size == 3  # the batch axis takes the run's batch
    for shapes, needle in (({"y": (1, 2)}, "not an input"), ({"x": (1, 2, 3)}, "has rank 3")):
        with pytest.raises(DataError, match=needle):
            input_specs(m, InputLayout(shapes=shapes))
    with pytest.raises(DataError, match="is 4 in the model, not 5"):
        input_specs(state_model(), InputLayout(shapes={"x": (1, 5)}))


def test_token_inputs_keep_the_documented_sequence_length():
    m = seq_model(T.INT64)  # an integer [batch, T] input: token ids
    assert synthetic(input_specs(m), 2)["x"].shape == (2, 16)


@pytest.mark.parametrize("dtype,np_dtype", [(T.BOOL, np.bool_), (T.INT32, np.int32), (T.FLOAT16, np.float16),
                                            (T.UINT8, np.uint8), (T.INT64, np.int64)])
def test_any_input_dtype(tmp_path, dtype, np_dtype):
    m = seq_model(dtype)
    x = (np.arange(15).reshape(5, 3) % 2).astype(np_dtype)
    np.savez(tmp_path / "d.npz", x=x)
    ds = load_npz(tmp_path / "d.npz", input_specs(m))
    assert ds.inputs["x"].dtype == np_dtype
    r = ft.evaluate(m, ds, bers=[0.0], trials=1, metric="sdc", provider="cpu", batch=2)
    assert r.points[0].value == 0
    info = ft.inspect(m, data=ds)
    assert info["inputs"][0]["run_shape"] == [1, 3] and info["totals"]["operations_per_item"] > 0


def test_shapes_from_data_for_inspect_inject_bench(tmp_path, capsys):
    m = seq_model()
    onnx.save(m, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=np.ones((4, 9), np.float32))
    mp, dp = str(tmp_path / "m.onnx"), str(tmp_path / "d.npz")
    code, out, err = run_cli(["inspect", mp], capsys)
    assert code == 1 and "axis 1 (T)" in err and len(err.strip().splitlines()) == 1
    code, out, _ = run_cli(["inspect", mp, "--data", dp, "--json"], capsys)
    info = json.loads(out)
    mul = next(s for s in info["sites"] if s["op_type"] == "Mul")
    assert code == 0 and mul["operations"] == 9 and info["inputs"][0]["run_shape"] == [1, 9]
    code, out, _ = run_cli(["inspect", mp, "--shape", "x:1,5", "--json"], capsys)
    assert code == 0 and next(s for s in json.loads(out)["sites"] if s["op_type"] == "Mul")["operations"] == 5
    code, out, _ = run_cli(["inject", mp, "-o", str(tmp_path / "i.onnx"), "--ber", "0.1", "--data", dp,
                            "--batch", "3"], capsys)
    assert code == 0 and "for a batch of 3" in out
    faults = np.load(tmp_path / "i.onnx.faults.npz")
    assert all(int(t[:, 0].max()) < 3 * 9 for t in faults.values())  # flat indices inside [3, 9] outputs
    code, out, _ = run_cli(["bench", mp, "--data", dp, "--batch", "2", "--repeats", "1", "--ber", "0.01",
                            "--provider", "cpu", "--json"], capsys)
    assert code == 0 and json.loads(out)["batch"] == 2


def test_onnxruntime_refusals_are_one_line(tmp_path, capsys):
    # Reshape [batch, T] -> [batch, 2, -1]: an odd T is refused by onnxruntime (at load or at run)
    nodes = [h.make_node("Reshape", ["x", "shape"], ["r"], name="reshape"),
             h.make_node("Mul", ["r", "two"], ["y"], name="mul")]
    inits = [nh.from_array(np.array([0, 2, -1], np.int64), "shape"), nh.from_array(np.array(2, np.float32), "two")]
    g = h.make_graph(nodes, "rs", [h.make_tensor_value_info("x", T.FLOAT, ["batch", "T"])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["batch", 2, None])], inits)
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8), tmp_path / "rs.onnx")
    code, _, err = run_cli(["inspect", str(tmp_path / "rs.onnx"), "--shape", "x:1,3"], capsys)
    assert code == 1 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxft: error: onnxruntime could not") and "x[" in lines[0]


@pytest.mark.parametrize("argv,needle", [
    (["inspect", "{m}", "--shape", "x"], "expected NAME:D0,D1"),
    (["inspect", "{m}", "--shape", "x:1,a"], "expected NAME:D0,D1"),
    (["inspect", "{m}", "--shape", "x:1,2", "--shape", "x:1,3"], "given twice"),
    (["inspect", "{m}", "--shape", "q:1,2"], "not an input"),
    (["inspect", "{m}", "--batch-axis", "x:one"], "expected NAME:AXIS"),
    (["inspect", "{m}", "--data", "{d}", "--shape", "x:1,2"], "--shape is for running without --data"),
    (["inject", "{m}", "-o", "{dir}/never.onnx", "--data", "{d}"], "need --ber"),
    (["eval", "vit", "{m}", "--ber", "0"], "has no bundled data"),
    (["bench", "{m}", "--shape", "x:1,4", "--max-faults", "-1"], "positive number"),
])
def test_argument_mistakes_caught_before_work(tmp_path, capsys, argv, needle):
    onnx.save(seq_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=np.ones((4, 9), np.float32))
    fill = {"m": str(tmp_path / "m.onnx"), "d": str(tmp_path / "d.npz"), "dir": str(tmp_path)}
    code, _, err = run_cli([a.format(**fill) for a in argv], capsys)
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "never.onnx").exists()


def _plans(m, batch):
    sess = InjectionSession(inject_pass(m).model, "cpu")
    return sess.plans(synthetic(input_specs(m), batch))


def test_expected_faults_counts_operations_bits_and_ber():
    m = state_model()
    plans = _plans(m, 4)
    # by hand, per item: MatMul [1x4]@[4x3]: 3 outputs x (4 products + 3 sums) x 32 bits; the
    # elementwise Div is a scalar (no batch axis: 1 item), Mul and Add give 3 results of 32 bits,
    # the state Mul [2, 4, 3] is 24 results (its batch is not on axis 0: counted as one whole item)
    by_hand = 4 * (3 * (4 + 3) * 32 + 3 * 32 + 3 * 32) + 32 + 24 * 32
    assert sum(p.bits_per_item * p.items for p in plans) == by_hand
    assert expected_faults(plans, 1e-3) == pytest.approx(by_hand * 1e-3)
    # and it is the mean of what sample_faults draws
    rng = np.random.default_rng(0)
    draws = [len(sample_faults(plans, 1e-3, rng)) for _ in range(400)]
    assert abs(np.mean(draws) - by_hand * 1e-3) < 4 * np.sqrt(by_hand * 1e-3 / 400)


class _NoDraws:
    def __getattr__(self, name):
        raise AssertionError(f"sampling started (rng.{name}) although the budget refuses the BER")


def test_max_faults_refused_before_sampling(tmp_path, capsys):
    plans = _plans(state_model(), 4)
    with pytest.raises(FaultBudgetError, match=r"flips per batch of 4 .*GiB|flips per batch of 4 .*MiB"):
        sample_faults(plans, 0.5, _NoDraws(), max_faults=100)
    assert len(sample_faults(plans, 0.5, np.random.default_rng(0), max_faults=None)) > 100
    ds = Dataset(state_data(4), None)
    with pytest.raises(FaultBudgetError, match="over the limit of 100"):  # eval: before its first faulty run
        ft.evaluate(state_model(), ds, bers=[0.0, 0.5], trials=1, metric="sdc", provider="cpu", batch=4,
                    max_faults=100)
    with pytest.raises(FaultBudgetError):  # bench: before any timing
        ft.bench(state_model(), ber=0.5, batch=4, provider="cpu", repeats=1, max_faults=100)
    onnx.save(state_model(), tmp_path / "m.onnx")
    code, _, err = run_cli(["inject", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "i.onnx"), "--ber", "0.5",
                            "--max-faults", "100"], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "--max-faults" in lines[0] and "flips per batch of 1" in lines[0]
    assert not (tmp_path / "i.onnx").exists() and not (tmp_path / "i.onnx.faults.npz").exists()


def test_eval_reports_phases_before_the_first_run():
    calls = []

    class Progress:
        def phase(self, text):
            calls.append(("phase", text))

        def __call__(self, done, total):
            calls.append(("run", done))

    ds = Dataset(state_data(4), None, None, {"x": 0, "state": 1, "sr": None})
    ft.evaluate(state_model(), ds, bers=[0.0], trials=1, metric="sdc", provider="cpu", batch=2, progress=Progress())
    first_run = calls.index(("run", 1))
    phases = [t for kind, t in calls[:first_run] if kind == "phase"]
    assert phases[0] == "building the injection graph" and "clean pass, batch 2/2" in phases


def test_fault_budget_counts_the_products_a_gemm_flip_recomputes():
    """A flip in a MatMul recomputes its element's K products: the budget counts them, so a BER
    whose flip count alone fits is refused when the recomputes would not."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    from onnxft.faults.sampling import BYTES_PER_FLIP, BYTES_PER_PRODUCT, expected_fault_bytes

    K = 512
    g = h.make_graph([h.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, ["b", K])], [h.make_tensor_value_info("y", T.FLOAT, ["b", 4])],
                     [nh.from_array(np.ones((K, 4), np.float32), "w")])
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    plans = _plans(model, 2)
    n = expected_faults(plans, 1e-4)
    assert expected_fault_bytes(plans, 1e-4) == pytest.approx(n * (BYTES_PER_FLIP + BYTES_PER_PRODUCT * K))  # one site
    budget = 2 * n  # twice the flips, far less than their recomputes
    with pytest.raises(FaultBudgetError, match="products a GEMM/Conv flip recomputes"):
        sample_faults(plans, 1e-4, _NoDraws(), max_faults=budget)
    assert len(sample_faults(plans, 1e-4, np.random.default_rng(0), max_faults=budget * (1 + BYTES_PER_PRODUCT * K /
                                                                                          BYTES_PER_FLIP))) >= 0
