"""Loading and saving models with clear errors; saves are atomic (temp file, then rename)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

_TWO_GB = 2**31 - 1


class ModelError(ValueError):
    pass


def load_model(path: str | Path) -> onnx.ModelProto:
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelError(f"{path} is a directory, not an ONNX file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError, missing external data…
        raise ModelError(f"{path} is not a readable ONNX model ({exc.__class__.__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'truncated or not protobuf'})") from None
    if not model.graph.node or not model.opset_import:
        raise ModelError(f"{path} is not a valid ONNX model (no graph or no opset)")
    return model


def check_writable(path: str | Path) -> Path:
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ModelError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ModelError(f"cannot write {path}: directory {parent} is not writable")
    if path.is_dir():
        raise ModelError(f"cannot write {path}: it is a directory")
    return path


def save_model(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write ``model`` to ``path`` atomically; models over 2 GB get an external-data file beside it."""
    path = check_writable(path)
    big = model.ByteSize() > _TWO_GB if _fits_bytesize(model) else True
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if big:
            data_name = path.name + ".data"
            tmp_data = path.parent / f".{data_name}.tmp"
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=tmp_data.name, size_threshold=1024)
            # The model refers to its data file by name: write it under the final name.
            m = onnx.load(tmp, load_external_data=False)
            for t in _external_tensors(m):
                for e in t.external_data:
                    if e.key == "location":
                        e.value = data_name
            onnx.save_model(m, tmp)
            os.replace(tmp_data, path.parent / data_name)
        else:
            onnx.save_model(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _fits_bytesize(model) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:
        return False


def _external_tensors(model: onnx.ModelProto):
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            yield t
