"""Input data: .npz files whose arrays are named after the model's inputs, and synthetic inputs."""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

_NP_TYPES = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.BOOL: np.bool_,
}


class DataError(ValueError):
    pass


@dataclass
class InputSpec:
    name: str
    dtype: type
    shape: list  # ints, or None for a dynamic axis


@dataclass
class Dataset:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    path: str | None = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batch(self, start: int, stop: int) -> dict[str, np.ndarray]:
        return {k: v[start:stop] for k, v in self.inputs.items()}

    def head(self, n: int) -> "Dataset":
        return Dataset({k: v[:n] for k, v in self.inputs.items()},
                       None if self.labels is None else self.labels[:n], self.path)

    def tail(self, n: int) -> "Dataset":
        return Dataset({k: v[-n:] for k, v in self.inputs.items()},
                       None if self.labels is None else self.labels[-n:], self.path)


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        specs.append(InputSpec(vi.name, _NP_TYPES.get(t.elem_type, np.float32), dims))
    return specs


def fixed_batch(specs: list[InputSpec]) -> int | None:
    """The only batch size a model exported with a static first axis accepts; None if any."""
    sizes = {s.shape[0] if s.shape else None for s in specs}
    return sizes.pop() if len(sizes) == 1 and None not in sizes else None


def load_npz(path: str | Path, specs: list[InputSpec]) -> Dataset:
    """Read and check an .npz against the model's inputs; raise DataError with one clear line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path} is not a readable .npz file ({exc.__class__.__name__})") from None
    labels = arrays.pop("y", None)
    inputs = {}
    for spec in specs:
        if spec.name in arrays:
            arr = arrays[spec.name]
        elif len(specs) == 1 and "x" in arrays:
            arr = arrays["x"]
        else:
            raise DataError(f"{path.name} has no array named {spec.name!r} (model inputs: "
                            f"{', '.join(s.name for s in specs)}; arrays: {', '.join(sorted(arrays)) or 'none'})")
        if arr.ndim != len(spec.shape):
            raise DataError(f"array for input {spec.name!r} has shape {arr.shape}, the model expects rank "
                            f"{len(spec.shape)} ({_fmt_shape(spec.shape)})")
        for i, (have, want) in enumerate(zip(arr.shape, spec.shape)):
            if i > 0 and want is not None and have != want:
                raise DataError(f"array for input {spec.name!r} has shape {arr.shape}, the model expects "
                                f"{_fmt_shape(spec.shape)}")
        if np.issubdtype(arr.dtype, np.floating) != np.issubdtype(np.dtype(spec.dtype), np.floating) \
                and spec.dtype is not np.bool_:
            raise DataError(f"array for input {spec.name!r} has dtype {arr.dtype}, the model expects "
                            f"{np.dtype(spec.dtype)}")
        inputs[spec.name] = arr.astype(spec.dtype, copy=False)
    sizes = {len(v) for v in inputs.values()}
    if labels is not None:
        labels = class_ids(labels, path.name)
        sizes.add(len(labels))
    if len(sizes) != 1:
        raise DataError(f"arrays in {path.name} disagree on the number of items: {sorted(sizes)}")
    if sizes == {0}:
        raise DataError(f"{path.name} holds no items")
    return Dataset(inputs, labels, str(path))


def class_ids(labels: np.ndarray, where: str = "the data") -> np.ndarray:
    """Labels as int64 class ids: ids ``[N]`` (or ``[N, 1]``), or one-hot rows ``[N, C]`` (converted
    by arg-max). Anything else (soft labels, other ranks, non-integer ids) is a DataError."""
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim == 2 and y.shape[1] > 1:
        if y.dtype == np.bool_ or np.issubdtype(y.dtype, np.number):
            values_ok = np.isin(y, (0, 1)).all()
            if values_ok and (y.astype(np.int64).sum(axis=1) == 1).all():
                return np.argmax(y, axis=1).astype(np.int64)
        raise DataError(f"labels y in {where} have shape {list(y.shape)} but are not one-hot (one 1 per row, "
                        "zeros elsewhere): give class ids [N] or one-hot [N, C]")
    if y.ndim != 1:
        raise DataError(f"labels y in {where} have shape {list(y.shape)}: give class ids [N] or one-hot [N, C]")
    if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.number):
        raise DataError(f"labels y in {where} have dtype {y.dtype}: give integer class ids [N] or one-hot [N, C]")
    if np.issubdtype(y.dtype, np.floating) and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        raise DataError(f"labels y in {where} are not whole numbers: give class ids [N] or one-hot [N, C]")
    if len(y) and y.min() < 0:
        raise DataError(f"labels y in {where} hold a negative class id ({int(y.min())})")
    return y.astype(np.int64)


def synthetic(specs: list[InputSpec], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for benchmarking or inspecting a model without data.

    Dynamic non-batch axes become 16 (sequence length) ; integer inputs get small ids (valid as
    token ids); inputs whose name contains ``mask`` get ones, ``token_type`` or ``segment``
    zeros (BERT's token-type vocabulary has two entries).
    """
    rng = np.random.default_rng(seed)
    out = {}
    for spec in specs:
        shape = [batch if i == 0 else (d if d is not None else 16) for i, d in enumerate(spec.shape)]
        if "mask" in spec.name.lower():
            out[spec.name] = np.ones(shape, spec.dtype)
        elif "token_type" in spec.name.lower() or "segment" in spec.name.lower():
            out[spec.name] = np.zeros(shape, spec.dtype)
        elif np.issubdtype(np.dtype(spec.dtype), np.integer):
            out[spec.name] = rng.integers(0, 100, size=shape).astype(spec.dtype)
        elif spec.dtype is np.bool_:
            out[spec.name] = np.ones(shape, np.bool_)
        else:
            out[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return out


def _fmt_shape(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
