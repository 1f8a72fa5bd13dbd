"""onnxft's custom-domain operators: ONNX functions of standard ops, with numpy references.

Installed as ``onnxft.custom_ops`` (see pyproject.toml). ``functions`` builds the FunctionProtos;
``reference`` holds a numpy implementation of each operator for the tests.
"""
from .functions import (  # noqa: F401
    FAULT_DOMAIN,
    FAULT_DOMAIN_VERSION,
    OPSET,
    all_functions,
    flip_bits_function,
    gemm_faults_function,
)
