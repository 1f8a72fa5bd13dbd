"""``inject(..., fault_free_path=True, transposed_weights=True)`` (what campaigns run): the whole injection graph behind
``If(any faults)``, the original nodes in the else branch. Without faults it must compute the
original model bit for bit; with faults, exactly what the plain injection graph computes."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxft import samples
from onnxft.faults.sampling import Faults, sample_faults
from onnxft.passes.inject import inject
from onnxft.runtime.data import input_specs, synthetic
from onnxft.runtime.session import InjectionSession


def bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


@pytest.mark.parametrize("name", ["vit", "resnet_int8"])
def test_fault_free_path_matches_original_and_injection_graph(name):
    model = onnx.load(samples.resolve_model(name)[0])
    feeds = synthetic(input_specs(model), 2, 0)
    fast = InjectionSession(inject(model, fault_free_path=True, transposed_weights=True, logging=True).model, "cpu", threads=1, level="basic")
    plain = InjectionSession(inject(model, logging=True).model, "cpu", threads=1, level="basic")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.intra_op_num_threads = 1
    original = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    want = original.run(None, feeds)
    got, plans = fast.clean(feeds)
    np.testing.assert_array_equal(bits(got[0]), bits(want[0]))
    assert [p.out_shape for p in plans] == [p.out_shape for p in plain.plans(feeds)]  # the probe takes the faulty branch
    np.testing.assert_array_equal(bits(fast.run(feeds, Faults.empty(), plans)[0]), bits(want[0]))
    for ber, seed in ((1e-7, 0), (1e-6, 1)):
        faults = sample_faults(plans, ber, np.random.default_rng(seed))
        assert len(faults)
        out_f, log_f = fast.run(feeds, faults, plans, with_log=True)
        out_p, log_p = plain.run(feeds, faults, plans, with_log=True)
        np.testing.assert_array_equal(bits(out_f[0]), bits(out_p[0]))
        assert set(log_f) == set(log_p)
        for key in log_p:
            np.testing.assert_array_equal(log_f[key], log_p[key])


def test_transposed_weights_fp16_matmul_bit_exact():
    # GemmFaultsBT_fp16 (weights read as B^T rows) against GemmFaults_fp16, whose results the dense
    # reference tests check: the same faults must give the same bits.
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(5)
    w = rng.standard_normal((16, 8)).astype(np.float16)
    g = h.make_graph([h.make_node("MatMul", ["x", "w"], ["y"])], "g",
                     [h.make_tensor_value_info("x", T.FLOAT16, ["B", 5, 16])],
                     [h.make_tensor_value_info("y", T.FLOAT16, ["B", 5, 8])], [nh.from_array(w, "w")])
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)
    feeds = {"x": rng.standard_normal((3, 5, 16)).astype(np.float16)}
    fast_model = inject(model, fault_free_path=True, transposed_weights=True).model
    assert any(f.name.startswith("GemmFaultsBT") for f in fast_model.functions)
    fast = InjectionSession(fast_model, "cpu", threads=1, level="basic")
    plain = InjectionSession(inject(model).model, "cpu", threads=1, level="basic")
    plans = fast.plans(feeds)
    for seed in range(3):
        faults = sample_faults(plans, 2e-3, np.random.default_rng(seed))
        assert len(faults)
        np.testing.assert_array_equal(bits(fast.run(feeds, faults, plans)[0]), bits(plain.run(feeds, faults, plans)[0]))
