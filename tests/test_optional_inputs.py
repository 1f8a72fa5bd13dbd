"""The graph ``onnxft inject`` writes: fault tables as optional inputs (passes/optional_inputs.py),
so plain onnxruntime runs it without a warning per table, with the same outputs fed or not."""
import subprocess
import sys

import numpy as np
import onnx

from models import labelled_data, tiny_cnn
from onnxft.campaigns.evaluate import trial_rng
from onnxft.faults.sampling import fault_feeds, sample_faults
from onnxft.passes.inject import inject
from onnxft.passes.optional_inputs import optional_fault_inputs
from onnxft.runtime.session import InjectionSession

_PLAIN_ORT = """
import sys, numpy as np, onnxruntime as ort
sys.modules["onnxft"] = None  # the written graph needs nothing from onnxft
sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
feeds = dict(np.load(sys.argv[2]))
clean = sess.run(["logits"], {"x": feeds["x"]})[0]
faulty = sess.run(["logits"], feeds)[0]
np.save(sys.argv[3], np.stack([clean, faulty]))
"""


def _plain_ort(model_path, feeds, tmp_path):
    np.savez(tmp_path / "feeds.npz", **feeds)
    p = subprocess.run([sys.executable, "-c", _PLAIN_ORT, str(model_path), str(tmp_path / "feeds.npz"),
                        str(tmp_path / "out.npy")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return np.load(tmp_path / "out.npy"), p.stderr


def test_optional_fault_inputs_run_without_warnings_and_equal_the_initializer_graph(tmp_path):
    m = tiny_cnn()
    base = inject(m).model
    written = optional_fault_inputs(base).model
    onnx.checker.check_model(written, full_check=True)
    assert not any(t.name.startswith("onnxft.") for t in written.graph.initializer)
    assert len(base.graph.initializer) > len(written.graph.initializer)  # the input did not change
    x, _ = labelled_data(m, 4)
    sess = InjectionSession(base, "cpu")
    plans = sess.plans({"x": x})
    faults = sample_faults(plans, 1e-2, trial_rng(0, 0, 0))
    feeds = {"x": x, **fault_feeds(plans, faults)}
    assert len(feeds) > 2
    onnx.save(written, tmp_path / "opt.onnx")
    onnx.save(base, tmp_path / "init.onnx")
    (clean, faulty), err = _plain_ort(tmp_path / "opt.onnx", feeds, tmp_path)
    assert err.strip() == "", err
    assert not np.array_equal(clean, faulty)
    np.testing.assert_allclose(clean, sess.clean({"x": x})[0][0], rtol=1e-5, atol=1e-6)
    (clean_init, faulty_init), err_init = _plain_ort(tmp_path / "init.onnx", feeds, tmp_path)
    np.testing.assert_array_equal(clean, clean_init)  # same graph, same onnxruntime settings: bit for bit
    np.testing.assert_array_equal(faulty, faulty_init)
    # the warnings this pass removes: one per fault table
    assert err_init.count("appears in graph inputs") == sum(1 for i in base.graph.input if i.name.startswith("onnxft."))
