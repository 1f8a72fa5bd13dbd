"""ABFT implementations (``abft(impl=...)``, ``harden --abft-impl``): fault-free outputs, the
standard-ONNX forms, what each one costs in the graph, and ig's per-GEMM choice (by arithmetic
intensity, or measured). Detection and recovery under faults for every implementation are in
tests/test_abft.py (its recovery tests are parametrised over ``impl``)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxft.campaigns.abft_impl import autotune, ig_choices, resolve
from onnxft.campaigns.harden import HardenOptions
from onnxft.passes.abft import AbftError, abft
from models import run_on_stock_onnxruntime
from test_abft import (IMPL_CASES, IMPL_MODELS, feeds_for, flags, gelu_linear_model, linear_model, perturbed,
                       run)

GEMM_OPS = ("MatMul", "Gemm", "FusedMatMul", "FusedGemm")


def optimised(model: onnx.ModelProto, tmp_path) -> onnx.ModelProto:
    """The graph onnxruntime runs at its default (all) optimisation level."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / "optimised.onnx"))


@pytest.mark.parametrize("kind,impl", IMPL_CASES)
def test_fault_free_identical_checked_and_portable(kind, impl, tmp_path):
    """Every implementation: full checker, outputs bit-identical to the original's at onnxruntime's
    default level (in-process) and on stock onnxruntime without onnxft, no flag raised."""
    model = IMPL_MODELS[kind]()
    r = abft(model, scheme="lb", block_size=4, impl=impl, expose_flags=True)
    assert r.details["gemms"][0]["impl"] == impl and r.details["gemms"][0]["impl_fallback"] is None
    onnx.checker.check_model(r.model, full_check=True)
    feeds = feeds_for(model, batch=3)
    want = run(model, feeds)["out"]
    got = run(r.model, feeds)
    np.testing.assert_array_equal(got["out"], want)
    assert flags(got) == (False, 0)
    plain = abft(model, scheme="lb", block_size=4, impl=impl).model
    stock = run_on_stock_onnxruntime(plain, feeds, tmp_path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    np.testing.assert_array_equal(
        stock, ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0])


@pytest.mark.parametrize("kind", ["linear", "gemm", "head"])
def test_dup_runs_two_products_after_onnxruntime_optimisation(kind, tmp_path):
    """Common-subexpression elimination would merge two identical products; dup's copy multiplies
    the negated weight (folded at load into its own initializer), so the optimised graph still has
    two GEMM kernels on A, and a corrupted first product is caught by the second."""
    model = IMPL_MODELS[kind]()
    r = abft(model, scheme="lb", block_size=4, impl="dup", expose_flags=True)
    opt = optimised(r.model, tmp_path)
    gemms = [n for n in opt.graph.node if n.op_type in GEMM_OPS]
    assert len(gemms) == 2 and len({n.input[0] for n in gemms}) == 1
    assert len({n.input[1] for n in gemms}) == 2
    # no weight copy in the file: the negation is a node
    assert sum(t.name == "w" for t in r.model.graph.initializer) == 1
    assert not any(np.array_equal(onnx.numpy_helper.to_array(t), -onnx.numpy_helper.to_array(
        next(i for i in model.graph.initializer if i.name == "w"))) for t in r.model.graph.initializer)
    # at the default level too, a change of one output element is detected and recovered
    feeds = feeds_for(model)
    want = run(model, feeds)["out"]
    delta = np.zeros(want.shape, np.float32)
    delta.flat[5] = 1e-3 * float(np.abs(want).max())
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    bad = ort.InferenceSession(perturbed(r.model).SerializeToString(), so, providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in bad.get_outputs()], bad.run(None, {**feeds, "delta": delta})))
    assert flags(got)[0]
    np.testing.assert_allclose(got["out"], want, rtol=1e-5, atol=1e-6)


def test_fused_widens_the_weight_in_place_of_the_original():
    """fused: one MatMul against [B | Be] (A unbounded: the scale still needs |A|), or
    [B | Be | tau|B|e] when A >= -c (GELU output: no pass over A at all); the widened weight and
    bias replace the originals in the file, and the product's first N columns are the Y every later
    node reads (the one the check reads)."""
    for model, extra in ((linear_model(), 1), (gelu_linear_model(), 2)):
        r = abft(model, scheme="lb", block_size=4, impl="fused", precision="fp32")
        inits = {t.name: t for t in r.model.graph.initializer}
        assert "w" not in inits and "bias" not in inits
        mm = next(n for n in r.model.graph.node if n.op_type == "MatMul" and n.input[1] in inits)
        assert list(inits[mm.input[1]].dims) == [8, 12 + extra]
        a = mm.input[0]
        abs_on_a = [n for n in r.model.graph.node if n.op_type == "Abs" and n.input[0] == a]
        reads_a = {a} | {n.output[0] for n in abs_on_a}
        einsum_on_a = [n for n in r.model.graph.node if n.op_type == "Einsum" and reads_a & set(n.input)]
        assert (len(abs_on_a), len(einsum_on_a)) == ((1, 1) if extra == 1 else (0, 0))  # the scale's pass only
        size = sum(np.prod(t.dims) for t in r.model.graph.initializer)
        assert size < sum(np.prod(t.dims) for t in model.graph.initializer) + 8 * 2 + 2 + 64


def test_impl_falls_back_to_global_with_the_reason():
    from test_abft import attention_model, gemm_model

    r = abft(attention_model(), scheme="lb", impl="dup")
    assert r.details["gemms"][0]["impl"] == "global"
    assert "constant weight" in r.details["gemms"][0]["impl_fallback"]
    r = abft(gemm_model(), scheme="lb", impl="fused")
    assert "alpha or beta" in r.details["gemms"][0]["impl_fallback"]
    r = abft(linear_model(), scheme="standard", impl="dup")
    assert r.details["gemms"][0]["impl"] == "global" and "LB-ABFT" in r.details["gemms"][0]["impl_fallback"]
    r = abft(linear_model(), scheme="lb", impl={"mm": "fused"})
    assert r.details["gemms"][0]["impl"] == "fused"
    with pytest.raises(AbftError, match="unknown ABFT implementation"):
        abft(linear_model(), impl="ig")
    with pytest.raises(AbftError, match="no MatMul/Gemm named"):
        abft(linear_model(), impl={"nope": "dup"})


def test_ig_choice_on_hand_computed_intensity():
    """linear_model at batch 2: two GEMMs [6, 8] @ [8, 12] sharing the weight:
    2 M N K x 2 = 2304 FLOP, 4 x (2*6*8 + 8*12 + 2*6*12) = 1344 bytes, AI = 1.714 FLOP/byte."""
    model = linear_model()
    feeds = feeds_for(model, batch=2)
    for ridge, want_regime, want in ((1.5, "compute", "global"), (2.0, "memory", "dup"), (1.7143, "memory", "dup"),
                                     (1.7142, "compute", "global")):
        c = ig_choices(model, feeds, ridge)["mm"]
        assert c["ai"] == pytest.approx(2304 / 1344)
        assert (c["regime"], c["impl"], c["M"], c["N"], c["K"], c["gemms"]) == (want_regime, want, 6, 12, 8, 2)
    impl, record = resolve("ig", model, feeds, {"ridge": 2.0, "source": "override"})
    assert impl == {"mm": "dup"} and record["policy"] == "ig" and record["batch"] == 2
    assert record["gemms"]["mm"]["ridge"] == 2.0
    assert resolve("fused", model, {}) == ("fused", {"policy": "fused"})
    with pytest.raises(ValueError, match="autotune"):
        resolve("global", model, {}, tune=True)


def test_autotune_measures_every_candidate_and_keeps_the_cheapest():
    model = linear_model()
    feeds = feeds_for(model, batch=4)
    out = autotune(model, feeds, repeats=3, threads=1, scheme="lb", block_size=4)
    costs = out["mm"]["costs_ms"]
    assert set(costs) == {"global", "fused", "dup"} and all(v > 0 for v in costs.values())
    assert out["mm"]["impl"] == min(costs, key=costs.get)
    impl, record = resolve("ig", model, feeds, {"ridge": 2.0}, tune=True, threads=1, repeats=2, scheme="lb",
                           block_size=4)
    assert record["autotune"] and set(record["gemms"]["mm"]["costs_ms"]) == {"global", "fused", "dup"}
    assert impl["mm"] == record["gemms"]["mm"]["impl"]


@pytest.mark.parametrize("impl", ["fused", "dup", "ig"])
def test_harden_with_each_impl_keeps_held_out_equivalence(impl, tmp_path):
    """harden's own held-out equivalence check (campaigns.equivalence, default optimisation level)
    on the sample ViT: bit-identical for every implementation; ig's plan records AI, ridge, regime
    and choice per GEMM."""
    from onnxft import api

    opts = HardenOptions(abft_impl=impl, range_mode="none", precision="fp32", ridge=2.5, batch=8)
    plan = api.harden("vit", tmp_path / "v.onnx", opts, calib_limit=48)
    v = plan["verification"]
    assert v["bit_identical"] and v["items"] > 0
    gemms = plan["gemms"]
    if impl == "ig":
        assert plan["abft_impl"]["policy"] == "ig" and plan["abft_impl"]["batch"] == 8
        assert all({"ai", "ridge", "regime", "impl_chosen"} <= set(g) for g in gemms)
        head = next(g for g in gemms if g["name"] == "/head/Gemm")
        assert head["regime"] == "memory" and head["impl"] == "dup"
        assert all(g["impl"] == ("fused" if g["name"].endswith("fc2/MatMul") else "global")
                   for g in gemms if g["regime"] == "compute")
    else:
        assert sum(g["impl"] == impl for g in gemms) >= 13  # every constant-weight GEMM but fallbacks


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="--autotune"):
        HardenOptions(autotune=True).validate()
    with pytest.raises(ValueError, match="--ridge"):
        HardenOptions(abft_impl="ig", ridge=-1.0).validate()
    # (the CLI's one-line errors: tests/test_harden_cli.py::test_harden_user_mistakes)


def test_check_bytes_and_the_fused_refinement():
    """check_bytes by hand (fp32): M = 10 rows, N = 4, K = 16, ridge 2:
    global, A bounded: 4 (MN + 2 MK) = 4 (40 + 320) = 1440; unbounded: 4 (MN + 4 MK) = 2720;
    fused, bounded: 4 x 3 MN + 2 M K x 2 / 2 = 480 + 320 = 800; unbounded: 480 + 4 x 3 MK + 160 = 2560."""
    from onnxft.analysis.intensity import check_bytes

    assert check_bytes(10, 4, 16, 2.0, True) == {"global": 1440.0, "fused": 800.0}
    assert check_bytes(10, 4, 16, 2.0, False) == {"global": 2720.0, "fused": 2560.0}
    # a GELU-input Linear (fc2 of an MLP: K = 8 > N... here [6, 8] @ [8, 12]) stays global when N > K,
    # and an unbounded input keeps global even where K is large relative to N
    model = gelu_linear_model()
    feeds = {"x": np.random.default_rng(0).standard_normal((4, 6, 8)).astype(np.float32)}
    row = ig_choices(model, feeds, 0.01)["fc2"]
    assert row["regime"] == "compute" and row["check_bytes"]["fused"] > row["check_bytes"]["global"]
    assert row["impl"] == "global"


def test_ig_picks_fused_for_the_mlp_output_linear_of_the_sample_vit():
    """Sample ViT at batch 8, ridge 2.5: every GEMM is compute-bound but the head ([8, 128] x
    [128, 10], AI 0.45 at batch 1): dup; fc2 ([50, 512] x [512, 128], input a GELU output): fused by
    check_bytes; everything else global."""
    from onnxft import samples

    model = onnx.load(samples.sample_model("vit")["path"])
    x = np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)
    rows = ig_choices(model, {model.graph.input[0].name: x}, 2.5)
    picks = {n: r["impl"] for n, r in rows.items()}
    assert picks["/head/Gemm"] == "dup" and rows["/head/Gemm"]["regime"] == "memory"
    assert all(v == "fused" for n, v in picks.items() if n.endswith("fc2/MatMul"))
    assert all(v == "global" for n, v in picks.items() if not n.endswith(("fc2/MatMul", "head/Gemm")))


@pytest.mark.parametrize("impl", ["fused", "dup"])
def test_unnamed_nodes(impl):
    """Exporters leave nodes unnamed: units are then named by their outputs, and the fused rewiring
    still finds the MatMul and its bias Add."""
    model = linear_model()
    for n in model.graph.node:
        n.name = ""
    r = abft(model, scheme="lb", block_size=4, impl=impl, expose_flags=True)
    assert r.details["gemms"][0]["impl"] == impl
    onnx.checker.check_model(r.model, full_check=True)
    feeds = feeds_for(model)
    got = run(r.model, feeds)
    np.testing.assert_array_equal(got["out"], run(model, feeds)["out"])
    assert flags(got) == (False, 0)


def test_ig_picks_fused_where_a_outgrows_l2():
    """An unbounded-input Linear [T, 256] @ [256, 256] (batch 4, ridge 2.5, AI far above it):
    check_bytes per row: global 4 (N + 4K) = 5120, fused 4 (3N + 3K) + 2K / 2.5 = 6348.8, so the
    byte rule alone keeps global; A = 4 T K x 4 bytes reaches FUSED_MIN_A_BYTES (1 MiB) at T = 256:
    fused there, global at T = 255."""
    from onnxft.analysis.intensity import FUSED_MIN_A_BYTES
    from test_abft import make, nh, vi, h

    rng = np.random.default_rng(0)
    model = make([h.make_node("MatMul", ["a", "w"], ["out"], name="mm")], [vi("a", ["n", "t", 256])],
                 [vi("out", ["n", "t", 256])], [nh.from_array(rng.standard_normal((256, 256)).astype(np.float32), "w")])
    assert FUSED_MIN_A_BYTES == 4 * 4 * 256 * 256
    for tokens, want in ((256, "fused"), (255, "global")):
        x = rng.standard_normal((4, tokens, 256)).astype(np.float32)
        row = ig_choices(model, {"a": x}, 2.5)["mm"]
        assert row["regime"] == "compute" and row["a_bytes"] == 4 * 4 * tokens * 256
        assert row["check_bytes"]["fused"] / (4 * tokens) == pytest.approx(6348.8)
        assert row["check_bytes"]["global"] / (4 * tokens) == 5120
        assert row["impl"] == want
