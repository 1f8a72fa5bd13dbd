"""The bundled sample models and data (onnxft/data/samples, made by samples/train_samples.py)."""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

DEFAULT_MODEL = "vit"


def samples_dir() -> Path:
    return Path(str(resources.files("onnxft.data") / "samples"))


def manifest() -> dict:
    path = samples_dir() / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"bundled samples are missing ({path}); reinstall onnxft")
    data = json.loads(path.read_text())
    for m in data["models"]:
        m["path"] = str(samples_dir() / m["file"])
    data["dataset"]["path"] = str(samples_dir() / data["dataset"]["file"])
    if "train_dataset" in data:
        data["train_dataset"]["path"] = str(samples_dir() / data["train_dataset"]["file"])
    return data


def sample_model(name: str) -> dict | None:
    for m in manifest()["models"]:
        if m["name"] == name:
            return m
    return None


def sample_data_path() -> str:
    return manifest()["dataset"]["path"]


def sample_train_path() -> str | None:
    """The bundled labelled training subset (distinct from the test data; samples/train_subset.py)."""
    entry = manifest().get("train_dataset")
    return entry["path"] if entry else None


def resolve_model(model: str | None) -> tuple[str, str | None]:
    """A model argument (path or sample name, or None for the default) -> (path, default data)."""
    if model is None:
        model = DEFAULT_MODEL
    looks_like_path = Path(model).exists() or model.endswith(".onnx") or "/" in model or "\\" in model
    entry = None if looks_like_path else sample_model(model)
    if entry is not None:
        return entry["path"], sample_data_path()
    return model, None


def sample_model_name(arg: str) -> bool:
    """Whether ``arg`` names a bundled sample (rather than a path)."""
    try:
        return resolve_model(arg)[1] is not None
    except FileNotFoundError:
        return False
