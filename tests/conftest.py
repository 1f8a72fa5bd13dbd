"""Test configuration: make ``tests/reference.py`` importable as ``reference`` and the repository
root importable (``custom_ops``), whichever way pytest was started."""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (_HERE, os.path.dirname(_HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)
