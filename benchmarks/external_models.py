"""onnxft on models from outside the repository, as a new user would run it.

    python benchmarks/external_models.py                     # everything, in a temporary folder
    python benchmarks/external_models.py --only bert,big     # a subset (names: see --list)
    python benchmarks/external_models.py --out /tmp/ext --keep

Each case exports (random weights, never downloaded) a model into the work folder, writes 8 items
of synthetic data as an .npz, then runs the Python API like a user:

* ``onnxft.api.inspect(model)``;
* ``onnxft.api.inject(model, out)`` + ``onnx.checker.check_model(out, full_check=True)`` + one
  fault-free run of ``out`` with plain onnxruntime;
* ``onnxft.api.evaluate(model, data, metric="sdc", bers=[0, 1e-7], trials=1, limit=8)``: SDC at
  BER 0 must be exactly 0;
* ``onnxft.api.harden(model, out, calib=data)`` (LB-ABFT + range restriction) +
  ``onnx.checker.check_model(out, full_check=True)`` + the hardened graph run by plain onnxruntime
  in a fresh Python process that cannot import onnxft, its outputs equal to the original model's
  (1e-5 relative), and ``evaluate(hardened, metric="sdc", bers=[1e-7])``.

Cases (optional dependencies: ``pip install timm transformers tensorflow-cpu tf2onnx``; a case
whose exporter is missing is reported as SKIP and does not fail the run unless --strict):

* timm (random init, small images): vit_tiny_patch16_224 (64 px), swin_tiny_patch4_window7_224
  (28 px, the smallest input whose first stage is one 7x7 window), cait_xxs24_224 (64 px, depth
  4), resnet18 (64 px); torch.onnx.export(dynamo=False), opset 17, dynamic batch;
* bert: transformers BertForSequenceClassification, 2 layers, hidden 64, int64 input_ids,
  attention_mask and token_type_ids, dynamic batch and sequence axes, opset 17;
* keras_cnn: a Keras NHWC Conv2D/BatchNorm/DepthwiseConv2D/Dense model converted by tf2onnx,
  opset 15;
* resnet18 at opsets 9, 11 and 13; a small torch CNN (BatchNorm kept, LayerNorm, GELU, Softmax,
  upsampling, HardSwish) at opset 9 without constant folding; resnet18 with every weight as a
  Constant node; a static-batch export (batch 2); an IR-3 opset-8 model built with onnx.helper
  whose initializers are listed as graph inputs (as IR 3 requires);
* big: a chain of nine 8192x8192 float32 MatMuls (2.25 GiB of weights in external data), written
  tensor by tensor (little memory) in the layout onnx.save_model(save_as_external_data=True)
  produces. Needs about 10 GB of memory (peak RSS measured: onnxruntime holds more than one
  session over the weights) and 5 GB of disk; removed afterwards unless --keep.

timm imports torchvision (for FrozenBatchNorm2d and data transforms only); where torchvision is
not installed, a stand-in module is registered so that model creation works.

Exit status: 0 when every run case passes every check, 1 otherwise.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxft.api as ft

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")

N_ITEMS = 8
BERS = [0.0, 1e-7]


class Skip(Exception):
    """The case cannot run here (a missing optional package); not a failure."""


@dataclass
class Row:
    name: str
    opset: int | None = None
    sites: int | None = None
    inspect_ok: bool = False
    inject_ok: bool = False
    sdc0: float | None = None
    sdc7: float | None = None
    faults7: float | None = None
    gemms: int | None = None  # protected by harden (LB-ABFT)
    ranges: int | None = None  # range-restricted activations
    harden_diff: float | None = None  # hardened vs original, plain onnxruntime without onnxft
    sdc7_hardened: float | None = None
    seconds: float = 0.0
    status: str = "FAIL"
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- exporters

def _torch():
    try:
        import torch
    except ImportError:
        raise Skip("torch is not installed (pip install torch)") from None
    torch.manual_seed(0)
    return torch


def _timm():
    _torch()
    try:
        import torchvision  # noqa: F401
    except ImportError:
        _stub_torchvision()
    try:
        import timm
    except ImportError:
        raise Skip("timm is not installed (pip install timm)") from None
    return timm


def _stub_torchvision() -> None:
    """timm imports torchvision at import time, for FrozenBatchNorm2d and data transforms that
    model creation does not use. Register a stand-in package answering any attribute."""
    import importlib.abc
    import importlib.machinery
    import types

    import torch

    class _Any:
        def __init__(self, *a, **k):
            pass

        def __call__(self, *a, **k):
            return _Any()

        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return _Any()

    class _Module(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            value = type(name, (torch.nn.Module,), {}) if name[:1].isupper() and "Norm" in name else _Any()
            setattr(self, name, value)
            return value

    class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            if name == "torchvision" or name.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            m = _Module(spec.name)
            m.__path__ = []
            return m

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, _Finder())


def _export_torch(model, args, path: Path, opset: int, names_in, names_out, dynamic=None, fold=True):
    torch = _torch()
    model.eval()
    with torch.no_grad():
        torch.onnx.export(model, args, str(path), dynamo=False, opset_version=opset,
                          input_names=names_in, output_names=names_out, dynamic_axes=dynamic,
                          do_constant_folding=fold)


def _images(path: Path, shape) -> Path:
    rng = np.random.default_rng(0)
    data = path.with_suffix(".npz")
    np.savez(data, x=rng.standard_normal((N_ITEMS, *shape)).astype(np.float32))
    return data


def timm_case(arch: str, size: int, **kwargs):
    def build(work: Path):
        timm = _timm()
        torch = _torch()
        extra = {} if arch == "resnet18" else {"img_size": size}
        model = timm.create_model(arch, pretrained=False, num_classes=10, **extra, **kwargs)
        path = work / f"{arch}.onnx"
        _export_torch(model, torch.randn(1, 3, size, size), path, 17, ["x"], ["logits"],
                      {"x": {0: "batch"}, "logits": {0: "batch"}})
        return path, _images(path, (3, size, size))
    return build


def resnet_opset(opset: int):
    def build(work: Path):
        timm = _timm()
        torch = _torch()
        path = work / f"resnet18_op{opset}.onnx"
        _export_torch(timm.create_model("resnet18", pretrained=False, num_classes=10),
                      torch.randn(1, 3, 32, 32), path, opset, ["x"], ["logits"],
                      {"x": {0: "batch"}, "logits": {0: "batch"}})
        return path, _images(path, (3, 32, 32))
    return build


def tiny_cnn_opset9(work: Path):
    torch = _torch()
    nn, F = torch.nn, torch.nn.functional

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
            self.ln = nn.LayerNorm(8)
            self.fc = nn.Linear(8 * 4 * 4, 10)

        def forward(self, x):
            y = F.relu(self.bn(self.c1(x)))
            y = F.max_pool2d(y, 2)
            y = F.hardswish(self.c2(y)) * torch.sigmoid(y.mean(dim=(2, 3), keepdim=True))
            y = F.interpolate(y, scale_factor=2, mode="nearest")
            y = F.adaptive_avg_pool2d(y, (4, 4)).clamp(-3, 3)
            y = F.gelu(self.ln(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
            z = self.fc(torch.flatten(y, 1))
            return F.log_softmax(z, dim=-1) + F.softmax(z, dim=1)

    path = work / "tiny_cnn_op9.onnx"
    # No constant folding: BatchNorm stays, its running mean arrives as Identity(bias).
    _export_torch(Tiny(), torch.randn(1, 3, 16, 16), path, 9, ["x"], ["y"],
                  {"x": {0: "batch"}, "y": {0: "batch"}}, fold=False)
    return path, _images(path, (3, 16, 16))


def constant_weights(work: Path):
    src, data = resnet_opset(13)(work)
    m = onnx.load(str(src))
    g = m.graph
    consts = [helper.make_node("Constant", [], [t.name], name=f"const/{t.name}", value=t) for t in g.initializer]
    inits = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    nodes = consts + list(g.node)
    del g.initializer[:], g.node[:], g.input[:]
    g.node.extend(nodes)
    g.input.extend(inputs)
    path = work / "resnet18_constant_nodes.onnx"
    onnx.save(m, str(path))
    return path, data


def static_batch(work: Path):
    timm = _timm()
    torch = _torch()
    path = work / "resnet18_static_b2.onnx"
    _export_torch(timm.create_model("resnet18", pretrained=False, num_classes=10),
                  torch.randn(2, 3, 32, 32), path, 17, ["x"], ["logits"], None)
    return path, _images(path, (3, 32, 32))


def legacy_ir3(work: Path):
    """Opset 8, IR 3 (initializers listed as graph inputs), Conv + BatchNorm + Gemm(transB)."""
    rng = np.random.default_rng(0)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(a, n) for n, a in [
        ("w", f32(8, 3, 3, 3) * 0.3), ("s", f32(8)), ("b", f32(8)), ("m", f32(8) * 0.1),
        ("v", np.abs(f32(8)) + 0.5), ("fw", f32(10, 8 * 8 * 8) * 0.05), ("fb", f32(10))]]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"]),
             helper.make_node("Relu", ["n"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]
    g = helper.make_graph(nodes, "legacy", inputs,
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 8)], producer_name="legacy")
    m.ir_version = 3
    path = work / "legacy_ir3_op8.onnx"
    onnx.save(m, str(path))
    return path, _images(path, (3, 16, 16))


def bert(work: Path):
    torch = _torch()
    try:
        from transformers import BertConfig, BertForSequenceClassification
    except ImportError:
        raise Skip("transformers is not installed (pip install transformers)") from None
    cfg = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=64, num_labels=3)
    model = BertForSequenceClassification(cfg).eval()
    model.config.return_dict = False
    ids = torch.randint(0, 1000, (2, 16))
    path = work / "bert_tiny.onnx"
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "seq"} for n in names}
    axes["logits"] = {0: "batch"}
    _export_torch(model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), path, 17, names, ["logits"], axes)
    rng = np.random.default_rng(0)
    data = work / "bert_tiny.npz"
    np.savez(data, input_ids=rng.integers(0, 1000, (N_ITEMS, 16)), attention_mask=np.ones((N_ITEMS, 16), np.int64),
             token_type_ids=np.zeros((N_ITEMS, 16), np.int64))
    return path, data


def keras_cnn(work: Path):
    try:
        import tensorflow as tf
        import tf2onnx
    except ImportError as exc:
        raise Skip(f"tensorflow/tf2onnx not installed ({exc}; pip install tensorflow-cpu tf2onnx)") from None
    tf.random.set_seed(0)
    L = tf.keras.layers
    inp = tf.keras.Input((16, 16, 3), name="image")
    y = L.Conv2D(8, 3, padding="same")(inp)
    y = L.BatchNormalization()(y)
    y = L.ReLU()(y)
    y = L.DepthwiseConv2D(3, padding="same")(y)
    y = L.MaxPooling2D()(y)
    y = L.Conv2D(16, 3, strides=2, activation="swish")(y)
    y = L.GlobalAveragePooling2D()(y)
    y = L.Dense(10, activation="softmax", bias_initializer="random_normal")(y)
    model = tf.keras.Model(inp, y)
    spec = (tf.TensorSpec((None, 16, 16, 3), tf.float32, name="image"),)

    @tf.function(input_signature=spec)
    def forward(x):
        return model(x, training=False)

    path = work / "keras_cnn.onnx"
    tf2onnx.convert.from_function(forward, input_signature=spec, opset=15, output_path=str(path))
    return path, _images(path, (16, 16, 3))


def big_external(work: Path):
    """Nine 8192x8192 float32 MatMuls: 2.25 GiB of weights, one external data file."""
    k, n = 8192, 9
    path = work / "big_external.onnx"
    data_name = path.name + ".data"
    rng = np.random.default_rng(0)
    inits, offset = [], 0
    with open(work / data_name, "wb") as f:
        for i in range(n):
            w = rng.standard_normal((k, k), dtype=np.float32)
            w *= np.float32(1 / math.sqrt(k))
            f.write(w.tobytes())
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[k, k],
                            data_location=TensorProto.EXTERNAL)
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(w.nbytes))):
                e = t.external_data.add()
                e.key, e.value = key, value
            offset += w.nbytes
            inits.append(t)
            del w
    nodes, cur = [], "x"
    for i in range(n):
        nodes.append(helper.make_node("MatMul", [cur, f"w{i}"], [f"h{i}"], name=f"matmul{i}"))
        cur = f"h{i}"
    nodes.append(helper.make_node("Relu", [cur], ["y"], name="relu"))
    g = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", k])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save_model(m, str(path))
    data = work / "big_external.npz"
    np.savez(data, x=rng.standard_normal((N_ITEMS, k)).astype(np.float32))
    return path, data


CASES = {
    "vit_tiny": timm_case("vit_tiny_patch16_224", 64),
    "swin_tiny": timm_case("swin_tiny_patch4_window7_224", 28),
    "cait_xxs24": timm_case("cait_xxs24_224", 64, depth=4),
    "resnet18": timm_case("resnet18", 64),
    "bert": bert,
    "keras_cnn": keras_cnn,
    "resnet18_op9": resnet_opset(9),
    "resnet18_op11": resnet_opset(11),
    "resnet18_op13": resnet_opset(13),
    "tiny_cnn_op9": tiny_cnn_opset9,
    "constant_weights": constant_weights,
    "static_batch": static_batch,
    "legacy_ir3": legacy_ir3,
    "big": big_external,
}


# ----------------------------------------------------------------------------- checks

def _opset(path: Path) -> int | None:
    m = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)


def _unexpected_skips(skipped) -> list[str]:
    """Skipped nodes other than integer shape arithmetic (which is not a fault site)."""
    out = []
    for s in skipped:
        node, reason = (s["node"], s["reason"]) if isinstance(s, dict) else s
        if "not a float" in reason or "is not fp32/fp16" in reason:
            continue
        out.append(f"{node}: {reason}")
    return out


def _run_plain_ort(path: Path, data: Path) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    z = np.load(data)
    names = [i.name for i in sess.get_inputs() if not i.name.startswith("onnxft.")]
    feeds = {}
    batch = sess.get_inputs()[0].shape[0]
    n = batch if isinstance(batch, int) else 2
    for i in sess.get_inputs():
        if i.name in names:
            arr = z[i.name] if i.name in z.files else z["x"]
            feeds[i.name] = arr[:n]
    out = sess.run(None, feeds)
    if not all(np.all(np.isfinite(o)) for o in out if np.issubdtype(o.dtype, np.floating)):
        raise AssertionError("the injection graph's fault-free output is not finite")


_PLAIN_ORT = """
import sys, json
import numpy as np, onnxruntime as ort
try:
    import onnxft  # noqa: F401
    print(json.dumps({"error": "onnxft is importable"})); sys.exit(0)
except ImportError:
    pass
z = np.load(sys.argv[3])
worst = 0.0
outs = []
for path in sys.argv[1:3]:
    so = ort.SessionOptions(); so.log_severity_level = 3
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    batch = s.get_inputs()[0].shape[0]
    n = batch if isinstance(batch, int) else 4
    feeds = {i.name: (z[i.name] if i.name in z.files else z["x"])[:n] for i in s.get_inputs()}
    outs.append(s.run(None, feeds))
for a, b in zip(*outs):
    if np.issubdtype(a.dtype, np.floating) and a.size:
        worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b))) / max(float(np.max(np.abs(a))), 1e-30))
    elif not np.array_equal(a, b):
        worst = float("inf")
print(json.dumps({"max_rel_diff": worst}))
"""


def _plain_ort_matches(original: Path, hardened: Path, data: Path) -> float:
    """Run both graphs in a fresh interpreter without onnxft on its path (-I: no site dir of the
    user, no PYTHONPATH, no cwd); returns the largest relative output difference."""
    import json
    import subprocess

    import onnxruntime

    site = str(Path(onnxruntime.__file__).parent.parent)
    code = f"import sys; sys.path[:0] = [{site!r}]\n" + _PLAIN_ORT
    # onnxft may be installed in the same site-packages (a non-editable install): refuse its import
    blocker = ("class NoOnnxft:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name == 'onnxft' or name.startswith('onnxft.'):\n"
               "            raise ImportError('onnxft is blocked in this process')\n"
               "sys.meta_path.insert(0, NoOnnxft())\n")
    code = code.replace("\nimport sys, json\n", "\nimport sys, json\n" + blocker, 1)
    env = {"PYTHONNOUSERSITE": "1", "PATH": os.environ.get("PATH", "")}
    out = subprocess.run([sys.executable, "-I", "-c", code, str(original), str(hardened), str(data)],
                         capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        raise AssertionError(f"plain onnxruntime failed on the hardened graph: {out.stderr.strip().splitlines()[-1:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if "error" in result:
        raise AssertionError(result["error"])
    return result["max_rel_diff"]


def run_case(name: str, build, work: Path) -> Row:
    row = Row(name)
    t0 = time.perf_counter()
    case_dir = work / name
    case_dir.mkdir(parents=True, exist_ok=True)
    try:
        path, data = build(case_dir)
        row.opset = _opset(path)
        t_export = time.perf_counter() - t0
        info = ft.inspect(str(path))
        row.sites = info["totals"]["sites"]
        row.inspect_ok = row.sites > 0
        skips = _unexpected_skips(info["skipped"])
        if skips:
            row.notes.append(f"{len(skips)} unexpected skip(s): {skips[:3]}")
        out = case_dir / "out" / (path.stem + ".inject.onnx")
        out.parent.mkdir(exist_ok=True)
        res = ft.inject(str(path), str(out))
        onnx.checker.check_model(str(out), full_check=True)
        _run_plain_ort(out, data)
        row.inject_ok = res["sites"] == row.sites
        ev = ft.evaluate(str(path), str(data), metric="sdc", bers=BERS, trials=1, limit=N_ITEMS, provider="cpu")
        row.sdc0, row.sdc7 = float(ev.points[0].value), float(ev.points[1].value)
        row.faults7 = float(ev.points[1].faults_per_item)
        hardened = case_dir / "out" / (path.stem + ".hardened.onnx")
        try:
            plan = ft.harden(str(path), str(hardened), calib=str(data))
        except Exception as exc:  # e.g. an opset-8 model: nothing protectable, said in one line
            row.notes.append(f"harden: {str(exc).splitlines()[0][:120]}")
            plan = None
        if plan is not None:
            onnx.checker.check_model(str(hardened), full_check=True)
            row.harden_diff = _plain_ort_matches(path, hardened, data)
            row.gemms = len(plan.get("gemms", []))
            row.ranges = len(plan.get("ranges", []))
            evh = ft.evaluate(str(hardened), str(data), metric="sdc", bers=[BERS[1]], trials=1, limit=N_ITEMS,
                              provider="cpu")
            row.sdc7_hardened = float(evh.points[0].value)
        ok = (row.inspect_ok and row.inject_ok and row.sdc0 == 0.0 and not skips
              and (plan is None or row.harden_diff <= 1e-5))
        row.status = "ok" if ok else "FAIL"
        row.notes.insert(0, f"export {t_export:.0f}s")
    except Skip as exc:
        row.status = "SKIP"
        row.notes.append(str(exc))
    except Exception as exc:  # report and go on with the other cases
        row.status = "FAIL"
        row.notes.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
        traceback.print_exc(limit=4, file=sys.stderr)
    row.seconds = time.perf_counter() - t0
    return row


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_row(r: Row) -> None:
    print(f"{r.name:<17} {_fmt(r.opset, '>5')} {_fmt(r.sites, '>6')} {'yes' if r.inspect_ok else 'no':>7} "
          f"{'yes' if r.inject_ok else 'no':>7} {_fmt(r.sdc0, '>6.3f')} {_fmt(r.sdc7, '>7.3f')} "
          f"{_fmt(r.faults7, '>10.1f')} {_fmt(r.gemms, '>5')} {_fmt(r.ranges, '>6')} {_fmt(r.harden_diff, '>9.1e')} "
          f"{_fmt(r.sdc7_hardened, '>9.3f')} {r.seconds:>7.1f}  {r.status:<4} {'; '.join(r.notes)}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated case names (default: all)")
    ap.add_argument("--skip", default="", help="comma-separated case names to leave out")
    ap.add_argument("--out", help="work folder (default: a temporary one, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the exported models")
    ap.add_argument("--strict", action="store_true", help="a skipped case (missing package) fails the run")
    ap.add_argument("--list", action="store_true", help="list the case names and exit")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(CASES))
        return 0
    names = args.only.split(",") if args.only else list(CASES)
    names = [n for n in names if n not in set(args.skip.split(","))]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="onnxft-external-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{'model':<17} {'opset':>5} {'sites':>6} {'inspect':>7} {'inject':>7} {'SDC@0':>6} {'SDC@1e-7':>7} "
          f"{'faults/item':>10} {'GEMMs':>5} {'ranges':>6} {'hard.diff':>9} {'SDC@1e-7h':>9} {'seconds':>7}  status notes",
          flush=True)
    rows = []
    try:
        for name in names:
            rows.append(run_case(name, CASES[name], work))
            print_row(rows[-1])
            if not args.keep:
                shutil.rmtree(work / name, ignore_errors=True)
    finally:
        if not args.keep and not args.out:
            shutil.rmtree(work, ignore_errors=True)
    counts = {s: sum(r.status == s for r in rows) for s in ("ok", "FAIL", "SKIP")}
    print(f"\nsummary: {counts['ok']} ok, {counts['FAIL']} failed, {counts['SKIP']} skipped "
          f"of {len(rows)} cases; total {sum(r.seconds for r in rows):.0f}s")
    for r in rows:
        if r.status != "ok":
            print(f"  {r.status} {r.name}: {'; '.join(r.notes)}")
    failed = counts["FAIL"] + (counts["SKIP"] if args.strict else 0)
    print(f"{counts['ok']} passed, {failed} failed" + (f", {counts['SKIP']} skipped" if counts["SKIP"] else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
