"""onnxft: exact bit-flip fault injection and hardening for ONNX models.

The Python API mirrors the CLI verbs one to one; see ``onnxft.api``.
"""
import os as _os

__version__ = "0.1.0"

# Installed, ``onnxft.custom_ops`` is the repository's top-level ``custom_ops/`` (pyproject maps it).
# Run from a source checkout (``python -m pytest`` puts the checkout first on sys.path), find it there.
_src_ops = _os.path.join(_os.path.dirname(_os.path.dirname(__file__)), "custom_ops")
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "custom_ops")) and _os.path.isfile(
        _os.path.join(_src_ops, "functions.py")):
    import importlib.util as _ilu
    import sys as _sys

    if "onnxft.custom_ops" not in _sys.modules:
        _spec = _ilu.spec_from_file_location("onnxft.custom_ops", _os.path.join(_src_ops, "__init__.py"),
                                             submodule_search_locations=[_src_ops])
        _mod = _ilu.module_from_spec(_spec)
        _sys.modules["onnxft.custom_ops"] = _mod
        _spec.loader.exec_module(_mod)
