"""Loading and saving models with clear errors; saves are atomic (temp file, then rename)."""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import onnx
from onnx.external_data_helper import load_external_data_for_model, uses_external_data

_TWO_GB = 2**31 - 1
# Metadata key naming the directory of the external data that a model over 2 GB keeps on disk.
EXTERNAL_DIR_KEY = "onnxft.external_data_dir"


class ModelError(ValueError):
    pass


def load_model(path: str | Path) -> onnx.ModelProto:
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelError(f"{path} is a directory, not an ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
        external = [t for t in _all_tensors(model) if uses_external_data(t)]
        # A model whose weights do not fit a 2 GB protobuf keeps them on disk: the passes work on
        # the small proto (external tensors hold only their location), and sessions and saves
        # find the data through EXTERNAL_DIR_KEY (see external_data_dir).
        if external and model.ByteSize() + sum(_nbytes(t) for t in external) > _TWO_GB:
            _set_external_dir(model, str(path.parent.resolve()))
        elif external:
            load_external_data_for_model(model, str(path.parent))
    except Exception as exc:  # protobuf DecodeError, missing external data…
        raise ModelError(f"{path} is not a readable ONNX model ({exc.__class__.__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'truncated or not protobuf'})") from None
    if not model.graph.node or not model.opset_import:
        raise ModelError(f"{path} is not a valid ONNX model (no graph or no opset)")
    return model


def external_data_dir(model: onnx.ModelProto) -> str | None:
    """Directory of the external data a model loaded by ``load_model`` keeps on disk, or None."""
    for p in model.metadata_props:
        if p.key == EXTERNAL_DIR_KEY:
            return p.value
    return None


def _set_external_dir(model: onnx.ModelProto, directory: str | None) -> None:
    keep = [p for p in model.metadata_props if p.key != EXTERNAL_DIR_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    if directory is not None:
        model.metadata_props.append(onnx.StringStringEntryProto(key=EXTERNAL_DIR_KEY, value=directory))


def _all_tensors(model: onnx.ModelProto):
    """Initializers and Constant-node tensors of every graph and subgraph."""
    graphs = [model.graph]
    while graphs:
        g = graphs.pop()
        yield from g.initializer
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield a.t
                elif a.type == onnx.AttributeProto.TENSORS:
                    yield from a.tensors
                elif a.type == onnx.AttributeProto.GRAPH:
                    graphs.append(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    graphs.extend(a.graphs)


def _nbytes(t: onnx.TensorProto) -> int:
    for e in t.external_data:
        if e.key == "length":
            return int(e.value)
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize * math.prod(t.dims)
    except Exception:
        return 0


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
    if external_data_dir(model) is not None:
        return _save_keeping_external(model, path)
    big = model.ByteSize() > _TWO_GB if _fits_bytesize(model) else True

    def write(tmp):
        if not big:
            onnx.save_model(model, tmp)
            return
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

    return write_atomically(path, write)


def write_atomically(path: Path, write) -> Path:
    """``write(tmp)`` a temp file beside ``path``, then rename it onto ``path``: a reader never
    sees a half-written file, and a failure leaves nothing behind."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # e.g. a read-only or pseudo file system that os.access calls writable
        raise ModelError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def file_mode() -> int:
    """Permissions of a newly created file under the current umask (mkstemp makes 0600 files)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


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


def _save_keeping_external(model: onnx.ModelProto, path: Path) -> Path:
    """Save a model whose weights stay on disk (see ``load_model``). Beside the source model its
    data files are reused; elsewhere they are copied to ``<name>.data`` beside ``path`` and the
    tensors' locations rewritten."""
    src = Path(external_data_dir(model))
    model = _copy(model)
    _set_external_dir(model, None)
    locations = sorted({e.value for t in _all_tensors(model) if uses_external_data(t)
                        for e in t.external_data if e.key == "location"})
    renames = {}
    if not path.parent.resolve().samefile(src):
        for i, loc in enumerate(locations):
            name = f"{path.name}.data" if len(locations) == 1 else f"{path.name}.{i}.data"
            tmp = path.parent / f".{name}.tmp"
            if tmp.exists():
                tmp.unlink()
            shutil.copyfile(src / loc, tmp)  # not a hard link: onnx's checker rejects those
            os.replace(tmp, path.parent / name)
            renames[loc] = name
    for t in _all_tensors(model):
        for e in t.external_data:
            if e.key == "location" and e.value in renames:
                e.value = renames[e.value]
    return write_atomically(path, lambda tmp: onnx.save_model(model, tmp))


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m
