"""Input data: .npz files whose arrays are named after the model's inputs, and synthetic inputs.

Every input has a *batch axis* (the axis along which items are stacked) or none (a scalar or a
configuration tensor such as a sample rate, fed whole with every batch). ``input_specs`` infers it
(``_infer_batch_axis``, docs/inputs.md); ``InputLayout.batch_axes`` overrides it
(``--batch-axis NAME:AXIS``).
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

_NP_TYPES = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64, onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32, onnx.TensorProto.INT16: np.int16, onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.UINT16: np.uint16, onnx.TensorProto.UINT32: np.uint32,
    onnx.TensorProto.UINT64: np.uint64, onnx.TensorProto.BOOL: np.bool_,
}
# Length given to a dynamic sequence axis of an integer [batch, sequence] input (token ids, attention
# masks, token types) when neither data nor --shape sets it: any length up to the model's maximum
# position runs, and 16 keeps inspect and bench quick.
TOKEN_SEQUENCE = 16


class DataError(ValueError):
    pass


@dataclass
class InputSpec:
    name: str
    dtype: type
    shape: list  # ints, or None for a dynamic axis
    batch_axis: int | None = 0  # None: no batch axis (fed whole with every batch)
    dim_names: list = field(default_factory=list)  # dim_param per axis ("" where none)


@dataclass(frozen=True)
class InputLayout:
    """What the user says about the model's inputs: ``shapes`` (``--shape NAME:D0,D1,…``, the
    batch axis' size is the run's batch) and ``batch_axes`` (``--batch-axis NAME:AXIS``, None = no
    batch axis)."""

    shapes: dict = field(default_factory=dict)  # name -> tuple of ints
    batch_axes: dict = field(default_factory=dict)  # name -> int | None


class Batch(dict):
    """Feeds for one run (input name -> array) that know how many items they hold (the size of the
    batch axis, which is not always axis 0 of the first input)."""

    def __init__(self, arrays: dict, batch_size: int):
        super().__init__(arrays)
        self.batch_size = int(batch_size)


@dataclass
class Dataset:
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    path: str | None = None
    batch_axes: dict = field(default_factory=dict)  # name -> axis or None; missing: 0 (None for a scalar)

    def axis(self, name: str) -> int | None:
        if np.ndim(self.inputs[name]) == 0:
            return None
        return self.batch_axes.get(name, 0)

    def __len__(self) -> int:
        for name, arr in self.inputs.items():
            ax = self.axis(name)
            if ax is not None:
                return int(np.shape(arr)[ax])
        return 1  # nothing is batched: the data is one item

    def _select(self, index) -> dict[str, np.ndarray]:
        out = {}
        for name, arr in self.inputs.items():
            ax = self.axis(name)
            out[name] = arr if ax is None else arr[(slice(None),) * ax + (index,)]
        return out

    def batch(self, start: int, stop: int) -> Batch:
        """Items ``start:stop``: each input sliced on its batch axis, the others whole."""
        stop = min(stop, len(self))
        return Batch(self._select(slice(start, stop)), max(stop - start, 0))

    def take(self, rows) -> Batch:
        """The items at ``rows`` (an index array), in that order."""
        rows = np.asarray(rows, np.int64)
        return Batch(self._select(rows), len(rows))

    def labels_of(self, start: int, stop: int) -> np.ndarray | None:
        """Labels of items ``start:stop`` (labels are one row per item)."""
        return None if self.labels is None else self.labels[start:stop]

    def head(self, n: int) -> "Dataset":
        return Dataset(self._select(slice(0, n)), self.labels_of(0, n), self.path, dict(self.batch_axes))

    def tail(self, n: int) -> "Dataset":
        start = max(len(self) - n, 0)
        return Dataset(self._select(slice(start, None)), None if self.labels is None else self.labels[start:],
                       self.path, dict(self.batch_axes))


def input_specs(model: onnx.ModelProto, layout: InputLayout | None = None) -> list[InputSpec]:
    """The model's data inputs (graph inputs that are not initializers) with their batch axes
    (inferred, then ``layout.batch_axes``) and dims (the model's, then ``layout.shapes``, then any
    dim whose dim_param another input or the model's metadata fixes). Raises DataError (one line)
    for a layout that names an unknown input or has the wrong rank."""
    layout = layout or InputLayout()
    inits = {t.name for t in model.graph.initializer}
    batch_params = _output_batch_params(model)
    specs = []
    for vi in model.graph.input:
        if vi.name in inits or vi.name.startswith("onnxft."):  # an injection graph's fault tables
            continue
        t = vi.type.tensor_type
        if t.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim]
            names = [d.dim_param if d.HasField("dim_param") else "" for d in t.shape.dim]
        else:  # rank unknown: only data or --shape can say
            dims, names = None, []
        specs.append(InputSpec(vi.name, _NP_TYPES.get(t.elem_type, np.float32), dims, 0, names))
    dynamic_batch = bool(batch_params) or any(s.shape and s.shape[0] is None for s in specs)
    for spec in specs:
        spec.batch_axis = _infer_batch_axis(spec.shape, spec.dim_names, batch_params, dynamic_batch)
    _image_size_from_metadata(model, specs)
    known = {s.name: s for s in specs}
    for name, axis in layout.batch_axes.items():
        spec = _spec_named(known, name, "--batch-axis")
        if axis is not None:
            rank = None if spec.shape is None else len(spec.shape)
            if rank is not None and not -rank <= axis < rank:
                raise DataError(f"--batch-axis {name}:{axis}: input {name!r} has rank {rank} "
                                f"({_fmt_shape(spec.shape)})")
            axis = axis % rank if rank else axis
        spec.batch_axis = axis
    bound = _metadata_bindings(model)
    for name, shape in layout.shapes.items():
        spec = _spec_named(known, name, "--shape")
        shape = [int(d) for d in shape]
        if spec.shape is not None and len(shape) != len(spec.shape):
            raise DataError(f"--shape {name}:{','.join(map(str, shape))} has rank {len(shape)}; input {name!r} "
                            f"has rank {len(spec.shape)} ({_fmt_shape(spec.shape)})")
        if spec.shape is None:
            spec.shape, spec.dim_names = [None] * len(shape), [""] * len(shape)
        for i, d in enumerate(shape):
            if i == spec.batch_axis:
                continue  # the batch axis takes the run's batch size
            if spec.shape[i] is not None and spec.shape[i] != d:
                raise DataError(f"--shape {name}: axis {i} of input {name!r} is {spec.shape[i]} in the model, not {d}")
            spec.shape[i] = d
            if spec.dim_names[i]:
                bound.setdefault(spec.dim_names[i], d)
    for spec in specs:  # dims named like a dim fixed above
        if spec.shape is not None:
            spec.shape = [bound.get(n, d) if d is None and i != spec.batch_axis else d
                          for i, (d, n) in enumerate(zip(spec.shape, spec.dim_names))]
    return specs


def _spec_named(known: dict, name: str, option: str) -> InputSpec:
    if name not in known:
        raise DataError(f"{option} names {name!r}, which is not an input of the model "
                        f"(inputs: {', '.join(known) or 'none'})")
    return known[name]


def _output_batch_params(model: onnx.ModelProto) -> set[str]:
    """dim_params of the outputs' first axes: the names the exporter gave the batch."""
    out = set()
    for o in model.graph.output:
        dims = o.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_param") and dims[0].dim_param and not o.name.startswith("onnxft."):
            out.add(dims[0].dim_param)
    return out


def _infer_batch_axis(dims, names, batch_params: set[str], dynamic_batch: bool) -> int | None:
    """The axis named like the outputs' batch (their first axis' dim_param); else, when the batch
    is dynamic (named in the outputs, or some input's first axis is dynamic) and this input's first
    axis is fixed, its first dynamic axis (an LSTM state [2, B, 128]) or none (a configuration
    tensor, fed whole); else 0. A scalar has none."""
    if dims is None:
        return 0
    if not dims:
        return None
    for i, n in enumerate(names):
        if n and n in batch_params:
            return i
    if dynamic_batch and dims[0] is not None:
        return next((i for i, d in enumerate(dims) if d is None), None)
    return 0


def _image_size_from_metadata(model: onnx.ModelProto, specs: list[InputSpec]) -> None:
    """Ultralytics exports record their image size as metadata ``imgsz: [H, W]``: it fixes the
    dynamic height and width of a 4-D NCHW image input."""
    meta = {p.key: p.value for p in model.metadata_props}
    try:
        h, w = (int(v) for v in meta.get("imgsz", "").strip("[]() ").split(","))
    except ValueError:
        return
    for spec in specs:
        if spec.shape is not None and len(spec.shape) == 4 and spec.batch_axis == 0:
            spec.shape[2] = spec.shape[2] or h
            spec.shape[3] = spec.shape[3] or w


def _metadata_bindings(model: onnx.ModelProto) -> dict[str, int]:
    """dim_params fixed by the model's metadata: a metadata key equal to a dim_param with an
    integer value (``{"sequence": "128"}``)."""
    out = {}
    for p in model.metadata_props:
        try:
            out[p.key] = int(p.value)
        except ValueError:
            pass
    return out


def fixed_batch(specs: list[InputSpec]) -> int | None:
    """The only batch size a model exported with a static batch axis accepts; None if any."""
    sizes = {s.shape[s.batch_axis] if s.shape is not None else None for s in specs if s.batch_axis is not None}
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
    inputs, axes = {}, {}
    for spec in specs:
        if spec.name in arrays:
            arr = arrays[spec.name]
        elif len(specs) == 1 and "x" in arrays:
            arr = arrays["x"]
        else:
            raise DataError(f"{path.name} has no array named {spec.name!r} (model inputs: "
                            f"{', '.join(s.name for s in specs)}; arrays: {', '.join(sorted(arrays)) or 'none'})")
        if spec.shape is not None:
            if arr.ndim != len(spec.shape):
                raise DataError(f"array for input {spec.name!r} has shape {arr.shape}, the model expects rank "
                                f"{len(spec.shape)} ({_fmt_shape(spec.shape)})")
            for i, (have, want) in enumerate(zip(arr.shape, spec.shape)):
                if i != spec.batch_axis and want is not None and have != want:
                    where = "" if spec.batch_axis is None else f" (batch axis {spec.batch_axis})"
                    raise DataError(f"array for input {spec.name!r} has shape {arr.shape}, the model expects "
                                    f"{_fmt_shape(spec.shape)}{where}")
        if np.issubdtype(arr.dtype, np.floating) != np.issubdtype(np.dtype(spec.dtype), np.floating) \
                and spec.dtype is not np.bool_:
            raise DataError(f"array for input {spec.name!r} has dtype {arr.dtype}, the model expects "
                            f"{np.dtype(spec.dtype)}")
        inputs[spec.name] = arr.astype(spec.dtype, copy=False)
        axes[spec.name] = spec.batch_axis if arr.ndim > 0 else None
    sizes = {inputs[k].shape[ax] for k, ax in axes.items() if ax is not None}
    if labels is not None:
        labels = class_ids(labels, path.name)
        sizes.add(len(labels))
    if len(sizes) > 1:
        raise DataError(f"arrays in {path.name} disagree on the number of items (on their batch axes): "
                        f"{sorted(sizes)}")
    if sizes == {0}:
        raise DataError(f"{path.name} holds no items")
    return Dataset(inputs, labels, str(path), axes)


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


def synthetic(specs: list[InputSpec], batch: int, seed: int = 0) -> Batch:
    """Random inputs for inspecting or benchmarking a model without data.

    Shapes: the batch axis gets ``batch``, other dims what ``input_specs`` resolved; a dynamic
    sequence axis of an integer or bool [batch, sequence] input (token ids, masks) gets
    ``TOKEN_SEQUENCE``; any other unresolved dim is a DataError naming the input and axis.
    Values: inputs whose name contains ``mask`` get ones, ``token_type`` or ``segment`` zeros
    (BERT's token-type vocabulary has two entries), other integer inputs small ids (valid token
    ids), bool inputs True, float inputs standard normal values.
    """
    rng = np.random.default_rng(seed)
    out = {}
    bound: dict[str, int] = {}
    for spec in specs:
        shape = _synthetic_shape(spec, batch, bound)
        lname = spec.name.lower()
        if "mask" in lname:
            out[spec.name] = np.ones(shape, spec.dtype)
        elif "token_type" in lname or "segment" in lname:
            out[spec.name] = np.zeros(shape, spec.dtype)
        elif spec.dtype is np.bool_:
            out[spec.name] = np.ones(shape, np.bool_)
        elif np.issubdtype(np.dtype(spec.dtype), np.integer):
            out[spec.name] = rng.integers(0, 100, size=shape).astype(spec.dtype)
        else:
            out[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return Batch(out, batch if any(s.batch_axis is not None for s in specs) else 1)


def _synthetic_shape(spec: InputSpec, batch: int, bound: dict) -> list[int]:
    if spec.shape is None:
        raise DataError(f"input {spec.name!r} has no shape in the model: give --shape {spec.name}:D0,D1,… "
                        f"or --data D.npz")
    token_like = (len(spec.shape) == 2 and spec.batch_axis == 0
                  and (spec.dtype is np.bool_ or np.issubdtype(np.dtype(spec.dtype), np.integer)))
    shape = []
    for i, (d, n) in enumerate(zip(spec.shape, spec.dim_names or [""] * len(spec.shape))):
        if i == spec.batch_axis:
            shape.append(batch)
        elif d is not None:
            shape.append(d)
        elif n and n in bound:
            shape.append(bound[n])
        elif token_like:
            shape.append(bound.setdefault(n or f"{spec.name}/{i}", TOKEN_SEQUENCE))
        else:
            hint = ",".join("B" if j == spec.batch_axis else str(v) if v is not None else (m or f"D{j}")
                            for j, (v, m) in enumerate(zip(spec.shape, spec.dim_names or [""] * len(spec.shape))))
            raise DataError(f"input {spec.name!r} axis {i}{f' ({n})' if n else ''} has no fixed size in the model: "
                            f"give --shape {spec.name}:{hint} with numbers, or --data D.npz")
    return shape


def describe_feeds(feeds: dict) -> str:
    """``x[8,3,16,16] float32, sr[] int64``: the inputs of a run, for error messages."""
    return ", ".join(f"{k}[{','.join(map(str, np.shape(v)))}] {np.asarray(v).dtype}" for k, v in feeds.items())


def _fmt_shape(shape) -> str:
    if shape is None:
        return "rank unknown"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
