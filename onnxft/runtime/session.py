"""ONNX Runtime sessions: provider choice, and running an injection graph with a fault set."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx

from ..faults.sampling import Faults, SitePlan, fault_feeds, make_plans
from ..faults.sites import PROBE_INPUT, SHAPES_OUTPUT, SOURCE_OPSET_KEY, SiteTable
from .data import describe_feeds, input_specs
from .model_io import external_data_dir

PROVIDERS = ("auto", "cpu", "cuda")
_PRELOADED = False
# CUDA options of every session: fp32 MatMul/Gemm/Conv in fp32, not TF32 (onnxruntime's default on
# Ampere and later), so the arithmetic is the fault model's; and cuDNN's algorithm chosen by
# heuristics, not by timing (the default EXHAUSTIVE search may pick another algorithm in another
# session, and BER 0 would then not reproduce the original model bit for bit).
CUDA_OPTIONS = {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}


class RuntimeError_(RuntimeError):
    pass


class InputError(RuntimeError_):
    """onnxruntime refused the inputs (or the model) of a run: one line for the user."""


def _ort_message(exc: Exception) -> str:
    """onnxruntime's own reason, without its ``[ONNXRuntimeError] : 2 : INVALID_ARGUMENT :`` prefix."""
    text = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
    if text.startswith("[ONNXRuntimeError]"):
        text = text.split(" : ", 3)[-1]
    return text if len(text) <= 400 else text[:400] + "…"


def _is_ort_error(exc: Exception) -> bool:
    return type(exc).__module__.startswith("onnxruntime")


class Session:
    """An onnxruntime InferenceSession whose ``run`` reports onnxruntime's refusals of the inputs
    (wrong shape, dtype, value) as one-line ``InputError``s naming the inputs; everything else is
    the InferenceSession's own."""

    def __init__(self, sess):
        self._sess = sess

    def __getattr__(self, name):
        return getattr(self._sess, name)

    def run(self, output_names, feeds, *args, **kwargs):
        try:
            return self._sess.run(output_names, feeds, *args, **kwargs)
        except Exception as exc:
            if not _is_ort_error(exc):
                raise
            shown = {k: v for k, v in feeds.items() if not k.startswith("onnxft.")}
            raise InputError(f"onnxruntime could not run the model on inputs {describe_feeds(shown)}: "
                             f"{_ort_message(exc)}") from None


def _ort():
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # onnxruntime's warnings are not the user's business

    global _PRELOADED
    if hasattr(ort, "preload_dlls") and _cuda_device_present() and not _PRELOADED:
        _PRELOADED = True
        import contextlib
        import io

        try:  # onnxruntime-gpu: load CUDA/cuDNN from pip wheels where present; harmless otherwise.
            # Once per process, and its "Failed to load" chatter kept off stdout (it would corrupt --json).
            with contextlib.redirect_stdout(io.StringIO()):
                ort.preload_dlls(directory="")
        except Exception:
            pass
    return ort


def providers_for(name: str) -> list[str]:
    """ORT provider list for ``auto``, ``cpu`` or ``cuda``."""
    ort = _ort()
    available = ort.get_available_providers()
    if name == "cpu":
        return ["CPUExecutionProvider"]
    if name == "cuda":
        if not _cuda_device_present():
            raise RuntimeError_("no CUDA device on this machine (use --provider cpu or auto)")
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError_("the CUDA provider is not available (install onnxruntime-gpu and a CUDA driver)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if name == "auto":
        return (["CUDAExecutionProvider", "CPUExecutionProvider"]
                if "CUDAExecutionProvider" in available and _cuda_device_present() else ["CPUExecutionProvider"])
    raise RuntimeError_(f"unknown provider {name!r}; choose from {', '.join(PROVIDERS)}")


def _cuda_device_present() -> bool:
    return any(Path("/dev").glob("nvidia[0-9]*")) or bool(os.environ.get("ONNXFT_FORCE_CUDA"))


def make_session(model: onnx.ModelProto | str | Path, provider: str = "auto", threads: int | None = None,
                 level: str = "all", disabled_optimizers: tuple[str, ...] = ()):
    """An ORT session. ``level="basic"`` turns off ORT's fusions (QDQ -> integer kernels, NCHWc
    convolutions, Gelu/LayerNorm fusion), whose arithmetic differs slightly from the graph's own;
    campaigns use it so that the injection graph at BER 0 equals the original model bit for bit."""
    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                   "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    ext_dir = external_data_dir(model) if isinstance(model, onnx.ModelProto) else None
    if ext_dir is not None:  # a model over 2 GB whose weights stay on disk (model_io.load_model)
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", ext_dir)
    providers = providers_for(provider)
    if "CUDAExecutionProvider" in providers:
        so.use_deterministic_compute = True
    options = [dict(CUDA_OPTIONS) if p == "CUDAExecutionProvider" else {} for p in providers]
    try:
        sess = ort.InferenceSession(data, so, providers=providers, provider_options=options,
                                    disabled_optimizers=list(disabled_optimizers) or None)
    except Exception as exc:
        if not _is_ort_error(exc):
            raise
        raise InputError(f"onnxruntime could not load the model{_static_note(model)}: {_ort_message(exc)}") from None
    if provider == "cuda" and "CUDAExecutionProvider" not in sess.get_providers():
        raise RuntimeError_("onnxruntime could not start the CUDA provider on this machine")
    return Session(sess)


def _static_note(model) -> str:
    """`` with inputs x[8,3,16,16]`` when the inputs were fixed to a run's shapes (with_static_inputs)."""
    if not isinstance(model, onnx.ModelProto):
        return ""
    inits = {t.name for t in model.graph.initializer}
    shapes = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if not all(d.HasField("dim_value") for d in dims):
            return ""
        shapes.append(f"{vi.name}[{','.join(str(d.dim_value) for d in dims)}]")
    return f" with inputs {', '.join(shapes)}" if shapes else ""


class InjectionSession:
    """An injection graph on ONNX Runtime.

    Level ``basic`` by default: it keeps BER 0 bit-identical to the original model (see
    ``make_session``) and is also the faster level here (sample ViT, batch 8, no faults: 36.7 ms
    at basic, 48.1 ms at all, against 29.6 ms for the original model).

    ``plans(feeds)`` runs it once with ``onnxft.probe`` set (every decomposed path taken) to learn
    each site's geometry for this input shape (cached per shape); ``run(feeds, faults)`` runs it
    with a fault set.
    """

    def __init__(self, model: onnx.ModelProto, provider: str = "auto", threads: int | None = None,
                 level: str = "basic"):
        self.model = model
        self.table = SiteTable.from_model(model)
        self._options = (provider, threads, level, _disabled_optimizers(model, level))
        self._sessions: dict[tuple, object] = {}  # one per input shape (see session_for)
        self._any_shape = None  # outputs_any_shape
        inits = {t.name for t in model.graph.initializer}
        self.input_names = [i.name for i in model.graph.input
                            if i.name not in inits and not i.name.startswith("onnxft.")]
        self.output_names = [o.name for o in model.graph.output if not o.name.startswith("onnxft.")]
        self.log_names = [s.log_output() for s in self.table.sites] if self.table.logging else []
        self.executions_names = [s.executions_output() for s in self.table.sites if s.path]
        self._plans: dict[tuple, list[SitePlan]] = {}
        self.providers = providers_for(provider)
        self._batch_axes = {s.name: s.batch_axis for s in input_specs(model)}

    def _key(self, feeds):
        return tuple((k, tuple(np.shape(v))) for k, v in sorted(feeds.items()))

    def batch_size(self, feeds) -> int:
        """Items in ``feeds``: a ``data.Batch`` knows; for a plain dict, the size of the first
        input's inferred batch axis (1 when no input has one)."""
        if hasattr(feeds, "batch_size"):
            return int(feeds.batch_size)
        for name, v in feeds.items():
            axis = self._batch_axes.get(name, 0)
            if axis is not None and np.ndim(v) > axis:
                return int(np.shape(v)[axis])
        return 1

    def _plans_key(self, feeds):
        """Plans depend on the input shapes, and with sites inside control flow on the values
        too (the branch an If takes, a Loop's trip count)."""
        key = self._key(feeds)
        if self.executions_names:
            key += tuple(hashlib.sha1(np.ascontiguousarray(v).tobytes()).hexdigest() for _, v in sorted(feeds.items()))
        return key

    def session_for(self, feeds):
        """A session specialised to these input shapes. With every shape static, onnxruntime's
        planner lets the fault scatters update a site's output in place instead of copying it."""
        key = self._key(feeds)
        if self.executions_names:  # user control flow: one session for every shape, because static
            # shapes make onnxruntime infer the untaken branches too, which real models (an If on
            # the sample rate) cannot always pass
            key = ()
        if key not in self._sessions:
            model = self.model if self.executions_names else with_static_inputs(self.model, feeds)
            self._sessions[key] = make_session(model, *self._options)
            self.providers = self._sessions[key].get_providers()
        return self._sessions[key]

    def outputs_any_shape(self, feeds) -> list[np.ndarray]:
        """Fault-free outputs from one session that takes any input shape, built once and kept apart
        from the per-shape sessions: for small probes (``outcomes.output_batch_axes``)."""
        if self._any_shape is None:
            self._any_shape = make_session(self.model, *self._options)
        return self._any_shape.run(self.output_names, feeds)

    def clean(self, feeds: dict[str, np.ndarray]) -> tuple[list[np.ndarray], list[SitePlan]]:
        """Fault-free outputs and the site plans for this input shape."""
        plans = self.plans(feeds)
        return self.session_for(feeds).run(self.output_names, feeds), plans

    def _probe(self, feeds) -> list[SitePlan]:
        # The probe run takes every decomposed path, so that all sites report their shapes.
        probe = dict(feeds)
        probe[PROBE_INPUT] = np.array(True)
        shapes, *executions = self.session_for(feeds).run([SHAPES_OUTPUT] + self.executions_names, probe)
        return make_plans(self.table, shapes, self.batch_size(feeds), dict(zip(self.executions_names, executions)))

    def plans(self, feeds) -> list[SitePlan]:
        key = (self._plans_key(feeds), self.batch_size(feeds))
        if key not in self._plans:
            if len(self._plans) >= 64:  # value-keyed plans (control flow): one per batch
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = self._probe(feeds)
        return self._plans[key]

    def run(self, feeds: dict[str, np.ndarray], faults: Faults, plans: list[SitePlan] | None = None,
            with_log: bool = False):
        plans = plans if plans is not None else self.plans(feeds)
        full = dict(feeds)
        full.update(fault_feeds(plans, faults))
        if with_log:
            if not self.table.logging:
                raise RuntimeError_("this injection graph was built without fault logging")
            res = self.session_for(feeds).run(self.output_names + self.log_names, full)
            n = len(self.output_names)
            return res[:n], dict(zip(self.log_names, res[n:]))
        return self.session_for(feeds).run(self.output_names, full)


def _disabled_optimizers(model: onnx.ModelProto, level: str) -> tuple[str, ...]:
    """Level-basic rewrites that would make the fault-free path of an injection graph (the original
    nodes, see ``inject(fault_free_path=True)``) round differently from the original model run at
    level basic with its dynamic batch axis (the campaigns' reference):

    * MatMulAddFusion turns MatMul+Add into Gemm only when shapes are static, and injection
      sessions are specialised to static shapes;
    * GeluFusionL1 fuses Erf-form GELU into the ONNX Gelu op only in models of opset 20 or later,
      and injection graphs are upgraded to opset 26.

    (Neither can apply to faulted sites, whose results pass through fault operators.)"""
    if level != "basic":
        return ()
    source = next((p.value for p in model.metadata_props if p.key == SOURCE_OPSET_KEY), None)
    return ("MatMulAddFusion",) + (("GeluFusionL1",) if source is not None and int(source) < 20 else ())


def with_static_inputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose data inputs have the shapes of ``feeds`` (weights are shared
    through serialisation, not deep-copied twice)."""
    if any(n.op_type in ("If", "Loop", "Scan") and not n.name.startswith("onnxft") for n in model.graph.node):
        # Static shapes make onnxruntime infer the untaken branches of an If too, which real models
        # (silero's If on the sample rate) cannot always pass: the model's own control flow keeps its
        # declared shapes (onnxft's Ifs, the fast path and ABFT recovery, are built for static shapes).
        return model
    static = onnx.ModelProto()
    saved = []
    for vi in model.graph.input:
        if vi.name in feeds:
            saved.append((vi, onnx.TypeProto()))
            saved[-1][1].CopyFrom(vi.type)
            dims = vi.type.tensor_type.shape.dim
            for d, size in zip(dims, np.shape(feeds[vi.name])):
                d.Clear()
                d.dim_value = int(size)
    try:
        static.ParseFromString(model.SerializeToString())
    finally:
        for vi, t in saved:
            vi.type.CopyFrom(t)
    return static
