"""ONNX Runtime sessions: provider choice, and running an injection graph with a fault set."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from ..faults.sampling import Faults, SitePlan, fault_feeds, make_plans
from ..faults.sites import SHAPES_OUTPUT, SiteTable

PROVIDERS = ("auto", "cpu", "cuda")


class RuntimeError_(RuntimeError):
    pass


def _ort():
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls") and _cuda_device_present():
        try:  # onnxruntime-gpu: load CUDA/cuDNN from pip wheels where present; harmless otherwise
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
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError_("the CUDA provider is not available (install onnxruntime-gpu and a CUDA driver)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if name == "auto":
        return (["CUDAExecutionProvider", "CPUExecutionProvider"]
                if "CUDAExecutionProvider" in available and _cuda_device_present() else ["CPUExecutionProvider"])
    raise RuntimeError_(f"unknown provider {name!r}; choose from {', '.join(PROVIDERS)}")


def _cuda_device_present() -> bool:
    return any(Path("/dev").glob("nvidia[0-9]*")) or bool(os.environ.get("ONNXFT_FORCE_CUDA"))


def make_session(model: onnx.ModelProto | str | Path, provider: str = "auto", threads: int | None = None):
    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(data, so, providers=providers_for(provider))
    if provider == "cuda" and "CUDAExecutionProvider" not in sess.get_providers():
        raise RuntimeError_("onnxruntime could not start the CUDA provider on this machine")
    return sess


class InjectionSession:
    """An injection graph on ONNX Runtime.

    ``plans(feeds)`` runs it once fault-free to learn each site's geometry for this input shape
    (cached per shape); ``run(feeds, faults)`` runs it with a fault set.
    """

    def __init__(self, model: onnx.ModelProto, provider: str = "auto", threads: int | None = None):
        self.table = SiteTable.from_model(model)
        self.session = make_session(model, provider, threads)
        self.input_names = [i.name for i in self.session.get_inputs() if not i.name.startswith("onnxft.")]
        outs = [o.name for o in self.session.get_outputs()]
        self.output_names = [o for o in outs if not o.startswith("onnxft.")]
        self.log_names = [s.log_output() for s in self.table.sites] if self.table.logging else []
        self._plans: dict[tuple, list[SitePlan]] = {}
        self.providers = self.session.get_providers()

    def _key(self, feeds):
        return tuple((k, tuple(np.shape(v))) for k, v in sorted(feeds.items()))

    def clean(self, feeds: dict[str, np.ndarray]) -> tuple[list[np.ndarray], list[SitePlan]]:
        """Fault-free outputs and the site plans for this input shape."""
        res = self.session.run(self.output_names + [SHAPES_OUTPUT], feeds)
        batch = _batch_of(feeds)
        key = self._key(feeds)
        if key not in self._plans:
            self._plans[key] = make_plans(self.table, res[-1], batch)
        return res[:-1], self._plans[key]

    def plans(self, feeds) -> list[SitePlan]:
        key = self._key(feeds)
        if key not in self._plans:
            self.clean(feeds)
        return self._plans[key]

    def run(self, feeds: dict[str, np.ndarray], faults: Faults, plans: list[SitePlan] | None = None,
            with_log: bool = False):
        plans = plans if plans is not None else self.plans(feeds)
        full = dict(feeds)
        full.update(fault_feeds(plans, faults))
        if with_log:
            if not self.table.logging:
                raise RuntimeError_("this injection graph was built without fault logging")
            res = self.session.run(self.output_names + self.log_names, full)
            n = len(self.output_names)
            return res[:n], dict(zip(self.log_names, res[n:]))
        return self.session.run(self.output_names, full)


def _batch_of(feeds) -> int:
    for v in feeds.values():
        if np.ndim(v) > 0:
            return int(np.shape(v)[0])
    return 1
