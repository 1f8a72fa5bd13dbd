"""ABFT thresholds (onnxft/passes/thresholds.py): adversarial fault-free inputs never raise a false
alarm, at every onnxruntime optimisation level and under emulated TF32, and the emulation is real
(the float32 bound does raise false alarms under it)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxft.graph.roles import PROTECTION, role_of
from onnxft.passes.abft import abft
from onnxft.passes.thresholds import (PRECISIONS, count_coefficients, precision, rounding_counts, tau_bound,
                                      unit_precision)

LEVELS = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def _model(nodes, inputs, outputs, inits):
    g = h.make_graph(nodes, "t", inputs, outputs, inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def linear(K, N, w, bias=None):
    """x [M, K] @ W [K, N] (+ bias): the torch Linear export."""
    nodes = [h.make_node("MatMul", ["x", "W"], ["y" if bias is None else "p"], name="fc")]
    inits = [nh.from_array(w.astype(np.float32), "W")]
    if bias is not None:
        nodes.append(h.make_node("Add", ["p", "b"], ["y"], name="fc_bias"))
        inits.append(nh.from_array(bias.astype(np.float32), "b"))
    return _model(nodes, [h.make_tensor_value_info("x", T.FLOAT, [None, K])],
                  [h.make_tensor_value_info("y", T.FLOAT, [None, N])], inits)


def gemm_trans(K, N, w, alpha):
    return _model([h.make_node("Gemm", ["x", "W"], ["y"], name="g", transB=1, alpha=alpha)],
                  [h.make_tensor_value_info("x", T.FLOAT, [4, K])], [h.make_tensor_value_info("y", T.FLOAT, [4, N])],
                  [nh.from_array(w.T.astype(np.float32).copy(), "W")])


def act_matmul(M, K, N):
    return _model([h.make_node("MatMul", ["a", "b"], ["y"], name="ab")],
                  [h.make_tensor_value_info("a", T.FLOAT, [2, M, K]), h.make_tensor_value_info("b", T.FLOAT, [2, K, N])],
                  [h.make_tensor_value_info("y", T.FLOAT, [2, M, N])], [])


def conv(cin, cout, k, w, bias):
    return _model([h.make_node("Conv", ["x", "W", "B"], ["y"], name="conv", pads=[1, 1, 1, 1])],
                  [h.make_tensor_value_info("x", T.FLOAT, [2, cin, 6, 6])],
                  [h.make_tensor_value_info("y", T.FLOAT, [2, cout, 6, 6])],
                  [nh.from_array(w.astype(np.float32), "W"), nh.from_array(bias.astype(np.float32), "B")])


def tf32_emulated(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every MatMul/Gemm/Einsum/Conv input (the model's and the checks') rounded to 10 mantissa
    bits first, as TF32 tensor cores do: Veltkamp's split hi = t - (t - x), t = x (2^13 + 1),
    rounds a float32 to its 11 leading significant bits."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    c = nh.from_array(np.float32(2**13 + 1), "tf32_split")
    m.graph.initializer.append(c)
    new = []
    for i, node in enumerate(m.graph.node):
        if node.op_type in ("MatMul", "Gemm", "Einsum", "Conv"):
            for j, x in enumerate(list(node.input[:2])):
                t, d, r = (f"tf32_{i}_{j}_{s}" for s in ("t", "d", "r"))
                new += [h.make_node("Mul", [x, "tf32_split"], [t]), h.make_node("Sub", [t, x], [d]),
                        h.make_node("Sub", [t, d], [r])]
                node.input[j] = r
        new.append(node)
    del m.graph.node[:]
    m.graph.node.extend(new)
    return m


def any_detection(model, feeds, level) -> bool:
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs() if o.name.endswith(".detected")]
    return any(bool(v) for v in s.run(names, feeds))


def tf32_worst_case():
    """Positive weights whose mantissas sit just below TF32's rounding point: every weight loses
    0.9 of half a TF32 ulp in the same direction, so the row sums of Y drift from A @ (B e) by
    about 4.4e-4 of |A| |B| e (float32's bound for K = N = 768: 1.4e-4)."""
    rng = np.random.default_rng(3)
    K, N = 768, 768
    w = (1 + 0.9 * 2.0**-11) * 2.0 ** rng.integers(-3, 3, (K, N))
    return linear(K, N, w), {"x": rng.uniform(0.1, 1.0, (8, K)).astype(np.float32)}


def swallowed(K=256, N=32):
    """Each output's accumulator sits at 1 and swallows K - 1 positive terms just below half its
    ulp (onnxruntime's CPU GEMM accumulates each output sequentially within 256-deep K blocks),
    while the checksum side adds them exactly: the row-sum residual reaches about K u (N - 1) / N,
    93% of the old bound gamma(K + N + 4) (test_swallowed_terms_reach_the_old_bound)."""
    u = 2.0**-24
    w = np.zeros((K, N))
    w[0, :] = 1
    w[1:, 1:] = 0.99 * u
    w[1:, 0] = 0.51 * 2.0 ** (np.floor(np.log2(N)) - 23) - (N - 1) * 0.99 * u
    return linear(K, N, w), {"x": np.ones((2, K), np.float32)}


def cases():
    """(label, model, feeds): fault-free inputs built to push the residual towards the bound."""
    rng = np.random.default_rng(0)
    out = []
    # long K, all positive: every partial sum of a sequential dot product rounds the same way
    K, N = 4096, 64
    w = rng.uniform(0.5, 1.0, (K, N)) / 3
    out.append(("K=4096 positive", linear(K, N, w), {"x": rng.uniform(0.5, 1.0, (4, K)).astype(np.float32) / 7}))
    # cancellation inside the dot products (x = [v, -v(1 + e)]) and across the row sum (W = [U, -U])
    K, N = 1024, 256
    u = rng.standard_normal((K, N // 2)) * 1e3
    v = rng.standard_normal((4, K // 2)) * 1e4
    x = np.concatenate([v, -v * (1 + 2.0**-20)], 1).astype(np.float32)
    w = np.concatenate([u, -u * (1 + 2.0**-22)], 1)
    out.append(("cancellation", linear(K, N, w, bias=rng.standard_normal(N) * 1e7), {"x": x}))
    # widely spread magnitudes (1e-4 .. 1e4), Gemm with transB and alpha
    K, N = 768, 768
    w = rng.standard_normal((K, N)) * 10.0 ** rng.uniform(-4, 4, (K, N))
    out.append(("spread, Gemm transB alpha", gemm_trans(K, N, w, 0.37),
                {"x": (rng.standard_normal((4, K)) * 10.0 ** rng.uniform(-4, 4, (4, K))).astype(np.float32)}))
    # activation x activation with cancelling rows
    a = rng.standard_normal((2, 16, 512)).astype(np.float32)
    b = rng.standard_normal((2, 512, 64)).astype(np.float32)
    b[:, :, 32:] = -b[:, :, :32]
    out.append(("activation x activation", act_matmul(16, 512, 64), {"a": a * 100, "b": b}))
    # Conv with large bias against small products
    w = rng.standard_normal((32, 64, 3, 3))
    out.append(("conv", conv(64, 32, 3, w, rng.standard_normal(32) * 1e4),
                {"x": rng.standard_normal((2, 64, 6, 6)).astype(np.float32) * 1e2}))
    out.append(("tf32 worst case",) + tf32_worst_case())
    out.append(("swallowed terms",) + swallowed())
    return out


CASES = cases()


@pytest.mark.parametrize("label,model,feeds", CASES, ids=[c[0] for c in CASES])
def test_no_false_alarm_at_every_level_and_under_tf32(label, model, feeds):
    for prec in ("fp32", "tf32"):
        hard = abft(model, scheme="lb", expose_flags=True, precision=prec).model
        for level in LEVELS:
            assert not any_detection(hard, feeds, level), (label, prec, level)
    hard = abft(model, scheme="lb", expose_flags=True, precision="tf32").model
    for level in ("disabled", "all"):
        assert not any_detection(tf32_emulated(hard), feeds, level), (label, "tf32 emulated", level)


def test_swallowed_terms_reach_the_old_bound():
    """The adversarial case is adversarial: its fault-free residual comes within 20% of the old
    bound gamma(K + N + 4) (which ignored the checksum side) and stays below the new one."""
    from onnxft.campaigns.calibrate_abft import calibrate_abft

    model, feeds = swallowed()
    c = calibrate_abft(model, [feeds], precision="fp32")["fc"]
    n = 256 + 32 + 4
    old = n * 2.0**-24 / (1 - n * 2.0**-24)
    assert 0.8 * old < c["max_ratio"] < c["tau_bound"]


def test_tf32_emulation_breaks_the_fp32_bound():
    """The emulation is real: with the float32 bound, TF32 arithmetic raises false alarms (this is
    why the default precision is tf32)."""
    model, feeds = tf32_worst_case()
    hard = abft(model, scheme="lb", expose_flags=True, precision="fp32").model
    assert not any_detection(hard, feeds, "all")
    assert any_detection(tf32_emulated(hard), feeds, "all")


def _truncate_tf32(x):
    return (np.asarray(x, np.float32).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


def test_tf32_truncation_stays_within_the_bound():
    """Tensor cores fed float32 registers drop the 13 low mantissa bits (truncation, error up to
    2^-10): both sides of the test computed that way in numpy float32 stay within the tf32 bound,
    with every weight truncated in the same direction."""
    rng = np.random.default_rng(7)
    K, N = 768, 768
    w = ((1 + 0.999 * 2.0**-10) * 2.0 ** rng.integers(-3, 3, (K, N))).astype(np.float32)
    x = rng.uniform(0.1, 1.0, (8, K)).astype(np.float32)
    tau = tau_bound(K, N, "tf32")
    y = _truncate_tf32(x) @ _truncate_tf32(w)
    r = y.sum(1, dtype=np.float32)
    be = w.astype(np.float64).sum(1).astype(np.float32)
    abe = (tau * np.abs(w.astype(np.float64)).sum(1)).astype(np.float32)
    ref = _truncate_tf32(x) @ _truncate_tf32(be)
    scale = np.abs(_truncate_tf32(x)) @ _truncate_tf32(abe)
    ratio = np.abs(r - ref) / scale
    assert ratio.max() <= 1.0
    assert ratio.max() > 0.15  # the case is close to tight (about 2^-10 of 4 x 2^-10 + (2K + N) u)
    assert (np.abs(r - ref) > tau_bound(K, N, "fp32") / tau * scale).all()  # fp32's bound would flag every row


def test_emulated_rounding_is_tf32():
    m = tf32_emulated(_model([h.make_node("MatMul", ["x", "W"], ["y"])], [h.make_tensor_value_info("x", T.FLOAT, [1, 1])],
                             [h.make_tensor_value_info("y", T.FLOAT, [1, 1])], [nh.from_array(np.ones((1, 1), np.float32), "W")]))
    x = np.random.default_rng(0).standard_normal((1, 1)).astype(np.float32)
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    bits = y.view(np.uint32) & 0x1FFF  # the 13 mantissa bits TF32 drops are zero
    assert int(bits[0, 0]) == 0 and abs(y[0, 0] - x[0, 0]) <= 2.0**-11 * abs(x[0, 0])


def test_bound_covers_both_sides_of_the_test():
    """Leading order (2K + N + extra + 2) u for float32 with offline checksums: the checksum side's
    own K-term dot product is counted (the old gamma(K + N + 4) was not)."""
    u = 2.0**-24
    for K, N in ((64, 64), (768, 3072), (4096, 4096)):
        t = tau_bound(K, N, "fp32")
        assert (2 * K + N + 2) * u < t < (2 * K + N + 2) * u * 1.01
        assert tau_bound(K, N, "fp32", extra_roundings=2) > t
        assert tau_bound(K, N, "fp32", runtime_checksums=True) > t + (N - 2) * u
        assert tau_bound(K, N, "tf32") > t + 4 * 2.0**-11 * 0.99
    assert tau_bound(2048, 8, "fp16") == float("inf")  # no finite bound for fp16 accumulation that long


def test_count_coefficients_are_the_counts():
    """``rounding_counts`` is affine in K and n_sum, and ``count_coefficients`` are its terms."""
    for prec in list(PRECISIONS) + [unit_precision("tf32", fp16=True)]:
        for extra, rc in ((0, False), (3, True)):
            const, per_k, per_n = count_coefficients(prec, extra, rc)
            for K, n in ((1, 1), (16, 7), (768, 3072), (50000, 10)):
                want = rounding_counts(K, n, prec, extra, rc)
                got = [c + K * k + n * m for c, k, m in zip(const, per_k, per_n)]
                assert got == pytest.approx(want, rel=0, abs=1e-9)


def test_graph_bound_equals_tau_bound():
    """The run-time threshold abft builds in the graph (float32, from run-time K and n) is
    ``tau_bound`` at those sizes: never below it, and within 2^-18 above it; +inf where no finite
    bound exists."""
    from onnxft.graph.checksums import Nodes
    from onnxft.passes.abft import _runtime_tau

    def f32(name):
        return h.make_tensor_value_info(name, T.FLOAT, [1])

    for prec in ("fp32", "tf32", "fp16", "fp16acc32", "bf16", unit_precision("tf32", fp16=True)):
        p = precision(prec) if isinstance(prec, str) else prec
        for extra, rc in ((0, False), (2, True)):
            nb = Nodes("t", 17)
            out = _runtime_tau(nb, p, extra, rc, "k", "n")
            m = _model(nb.nodes, [f32("k"), f32("n")], [f32(out)], nb.initializers)
            sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
            for K, n in ((1, 1), (4, 4), (197, 64), (768, 3072), (4096, 4096), (1500, 10), (50000, 10)):
                got = float(sess.run([out], {"k": np.float32([K]), "n": np.float32([n])})[0][0])
                want = tau_bound(K, n, p, extra, rc)
                if np.isinf(want):
                    assert np.isinf(got), (p.name, K, n)
                else:
                    assert want <= got <= want * (1 + 2.0**-18), (p.name, extra, rc, K, n, got, want)


def test_float16_unit_precision_is_the_coarser():
    p = unit_precision("tf32", fp16=True)
    assert (p.u_in, p.u_acc, p.u_elt) == (2.0**-10, 2.0**-11, 2.0**-11)
    assert unit_precision("fp32", fp16=True) is PRECISIONS["fp16"]
    assert unit_precision("bf16", fp16=True).u_out == 2.0**-8
    assert unit_precision("tf32") is PRECISIONS["tf32"]
    for K, n in ((16, 24), (768, 64)):
        b = tau_bound(K, n, p)
        assert b >= tau_bound(K, n, "fp16") and b >= tau_bound(K, n, "tf32")


def test_precision_names():
    assert precision("tf32").u_in == 2.0**-10 and precision("bf16").u_in == 2.0**-8
    with pytest.raises(ValueError, match="unknown precision 'fp64'"):
        precision("fp64")
    from onnxft.passes.abft import AbftError

    with pytest.raises(AbftError, match="unknown precision"):
        abft(linear(4, 4, np.eye(4)), precision="int4")


def test_precision_reaches_the_plan():
    model = linear(64, 32, np.random.default_rng(0).standard_normal((64, 32)))
    taus = {p: abft(model, precision=p).details["gemms"][0]["tau"] for p in ("fp32", "tf32", "bf16")}
    assert taus["fp32"] < taus["tf32"] < taus["bf16"]
    assert all(role_of(n) == PROTECTION for n in abft(model).model.graph.node if n.name.startswith("onnxft"))


def test_default_thresholds_raise_no_false_alarm_on_the_sample_models():
    """harden's default (tf32 rounding bounds) on the bundled ViT and ResNet, 64 test images, at
    onnxruntime's default level and with optimisations off: no GEMM or Conv flags a fault-free
    image (benchmarks/abft_false_alarms.py --precision tf32 --level all runs all 2000)."""
    from onnxft import samples

    x = np.load(samples.sample_data_path())["x"][:64]
    for name in ("vit", "resnet"):
        model = onnx.load(samples.sample_model(name)["path"])
        hard = abft(model, expose_flags=True).model
        feeds = {model.graph.input[0].name: x.astype(np.float32)}
        for level in ("disabled", "all"):
            assert not any_detection(hard, feeds, level), (name, level)
