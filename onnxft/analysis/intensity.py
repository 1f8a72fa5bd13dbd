"""Arithmetic intensity of every GEMM and convolution, and the seed's per-layer regime rule.

Seed 004 (Kosaian & Rashmi, SC'21) sorts layers by arithmetic intensity,

    AI = operations / bytes moved,  operations = 2 M N K per GEMM,
    bytes = element size x (elements of A read + elements of B read + elements of Y written),

against the device's ridge point (peak GEMM FLOP/s divided by memory bandwidth, see
``runtime.ridge``): a layer with AI at or above the ridge is compute-bound, below it
memory-bound. The seed's rule: a separate ("global") checksum pass suits compute-bound layers,
whose few extra operations are cheap next to the GEMM; a memory-bound layer should check inside
the computation that already holds its data (``MEMORY_BOUND_IMPL``: duplicate-and-compare, measured
cheapest for such GEMMs on onnxruntime's CPU provider; ``fused``, the checksum column appended to the
weight, is the seed's own form).

Shapes are the ones the model really runs at: ``gemm_intensities`` runs the model once on the given
feeds with every GEMM/Conv operand as an extra output, so run-time token and sequence axes, and
shapes computed by Shape/Gather chains, are measured rather than guessed. Bytes count each operand
once per call (the minimum traffic, the seed's convention): a weight shared by every item of a batch
is read once per batch, which is why AI grows with the batch.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import onnx

REGIMES = ("memory", "compute")
_ELEM_BYTES = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2,
               onnx.TensorProto.DOUBLE: 8, onnx.TensorProto.INT8: 1, onnx.TensorProto.UINT8: 1}


@dataclass(frozen=True)
class Intensity:
    """One GEMM or Conv call at its run-time shapes (all items of the batch together)."""

    name: str
    op_type: str
    M: int          # output rows per GEMM (Conv: output positions per item x items)
    N: int          # output columns (Conv: output channels per group)
    K: int          # inner dimension (Conv: input channels per group x kernel size)
    gemms: int      # independent GEMMs in the call (batched MatMul's leading dims; Conv: groups)
    flops: int      # 2 M N K x gemms
    bytes: int      # element size x (A + B + Y elements), each operand once
    ai: float       # flops / bytes

    def to_dict(self) -> dict:
        return asdict(self)


def gemm_ai(M: int, N: int, K: int, gemms: int = 1, elem_bytes: int = 4, shared_b: bool = True) -> tuple[int, int, float]:
    """(flops, bytes, AI) of ``gemms`` GEMMs ``[M, K] @ [K, N]``; ``shared_b``: one B for all (a weight)."""
    if min(M, N, K, gemms) < 1:
        raise ValueError(f"GEMM dimensions must be positive, got M={M} N={N} K={K} gemms={gemms}")
    flops = 2 * M * N * K * gemms
    b_elems = K * N * (1 if shared_b else gemms)
    nbytes = elem_bytes * (gemms * M * K + b_elems + gemms * M * N)
    return flops, nbytes, flops / nbytes


def regime(ai: float, ridge: float) -> str:
    """The seed's rule: compute-bound at or above the ridge point, memory-bound below it."""
    if not (ridge > 0 and math.isfinite(ridge)):
        raise ValueError(f"the ridge point must be a positive number of FLOP per byte, got {ridge}")
    return "compute" if ai >= ridge else "memory"


# Below the ridge the seed checks inside the computation that already holds the data (its
# thread-level ABFT). Of onnxft's forms (passes.abft.IMPLS), the one measured cheapest for
# memory-bound GEMMs on onnxruntime's CPU provider (GEMVs such as a classifier head at batch 1-8)
# is duplicate-and-compare, ``dup``; see docs/abft.md "Implementations".
MEMORY_BOUND_IMPL = "dup"


def choose_impl(ai: float, ridge: float, memory_impl: str = MEMORY_BOUND_IMPL) -> str:
    """ABFT implementation by the seed's rule: ``global`` (a separate checksum pass) for compute-bound
    GEMMs, ``memory_impl`` (a check inside the computation's own data traffic) for memory-bound ones."""
    return "global" if regime(ai, ridge) == "compute" else memory_impl


# Above this many bytes of ``A`` per call (all rows of a batch), a compute-bound Linear's ``fused``
# check beats ``global`` on onnxruntime's CPU provider even without a lower bound on ``A``: ``global``
# reads ``A`` once more for ``A (B e)``, and once ``A`` no longer fits in a core's L2 cache (1 MiB on
# the machine measured) that pass goes to L3/DRAM, while ``fused`` gets ``A (B e)`` from the GEMM's
# own pass. Measured (docs/abft.md "Measured: implementations"): ViT-S-sized at batch 8 (``A`` of
# the qkv/proj/fc1 Linears 2.4 MB) fused on every Linear 1.02-1.10x vs global 1.10-1.16x, each
# Linear class moved to fused lowering the total; at batch 1 (0.3 MB) and on the sample ViT at
# batch 8 (0.2 MB) fused on those Linears is no better or worse (its 1-2 extra GEMM columns and the
# Slice of ``Y`` cost more than an in-cache pass over ``A``).
FUSED_MIN_A_BYTES = 1 << 20


def check_bytes(M: int, N: int, K: int, ridge: float, a_bounded: bool, elem_bytes: int = 4) -> dict[str, float]:
    """Memory traffic of the main-graph check of ``M`` rows (all GEMMs of the call) of ``[M, K] @ [K, N]``
    with a constant weight, per implementation, in bytes plus extra FLOPs / ridge (both as time at the
    device's bandwidth):

    - ``global``: row sums of Y (reads ``MN``), ``A (B e)`` (reads ``MK``) and the scale ``|A| (tau|B|e)``
      (reads ``MK`` when ``A >= -c``; else ``|A|`` is written and read too: ``3 MK``);
    - ``fused``: the slice of Y out of the widened product (reads and writes ``MN``), its row sums
      (``MN``), the scale (nothing when ``A >= -c``: a GEMM column; else ``3 MK``), and the GEMM's
      ``2 M K`` FLOPs per extra column (2 with a bound, 1 without).
    """
    mn, mk = elem_bytes * M * N, elem_bytes * M * K
    glob = mn + (2 * mk if a_bounded else 4 * mk)
    fused = 3 * mn + (0 if a_bounded else 3 * mk) + 2 * M * K * (2 if a_bounded else 1) / ridge
    return {"global": float(glob), "fused": float(fused)}


def _operands(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, list[str]]]:
    """Main-graph MatMul/Gemm/Conv nodes and the tensors whose shapes define their work."""
    out = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in ("MatMul", "Gemm", "Conv"):
            out.append((node, [node.input[0], node.input[1], node.output[0]]))
    return out


def _elem_bytes(model: onnx.ModelProto, tensor: str, fallback: int = 4) -> int:
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if vi.name == tensor:
            return _ELEM_BYTES.get(vi.type.tensor_type.elem_type, fallback)
    for init in model.graph.initializer:
        if init.name == tensor:
            return _ELEM_BYTES.get(init.data_type, fallback)
    return fallback


def describe_call(node: onnx.NodeProto, a_shape, b_shape, y_shape, elem_bytes: int = 4) -> Intensity:
    """The intensity of one call from its operand shapes (hand-checkable: see tests)."""
    name = node.name or node.output[0]
    if node.op_type == "Conv":
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        items, c_out = int(y_shape[0]), int(y_shape[1])
        positions = int(np.prod(y_shape[2:], dtype=np.int64))
        k = int(np.prod(b_shape[1:], dtype=np.int64))  # C_in / group x kernel
        n = c_out // group
        m = items * positions
        flops = 2 * m * n * k * group
        nbytes = elem_bytes * (int(np.prod(a_shape, dtype=np.int64)) + int(np.prod(b_shape, dtype=np.int64))
                               + int(np.prod(y_shape, dtype=np.int64)))
        return Intensity(name, "Conv", m, n, k, group, flops, nbytes, flops / nbytes)
    trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0) if node.op_type == "Gemm" else 0
    a = list(a_shape)
    if len(a) == 1:
        a = [1] + a
    k = int(a[-2] if trans_a else a[-1])
    y = list(y_shape) if len(y_shape) >= 2 else [1] + list(y_shape)
    m, n = int(y[-2]), int(y[-1])
    gemms = int(np.prod(y[:-2], dtype=np.int64)) if len(y) > 2 else 1
    shared_b = len(b_shape) <= 2
    flops, nbytes, ai = gemm_ai(m, n, k, gemms, elem_bytes, shared_b)
    return Intensity(name, node.op_type, m, n, k, gemms, flops, nbytes, ai)


def gemm_intensities(model: onnx.ModelProto, feeds: dict[str, np.ndarray], provider: str = "cpu") -> list[Intensity]:
    """Every main-graph MatMul/Gemm/Conv at the shapes it runs at on ``feeds`` (one fault-free run)."""
    from ..runtime.session import make_session

    calls = _operands(model)
    if not calls:
        return []
    wanted = []
    for _, tensors in calls:
        wanted += [t for t in tensors if t not in wanted]
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for t in wanted:
        if t not in inits and t not in have and t not in feeds:
            probe.graph.output.append(onnx.ValueInfoProto(name=t))
            have.add(t)
    sess = make_session(probe, provider, level="basic")
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, sess.run(names, feeds)))
    shapes = {**inits, **{k: np.shape(v) for k, v in feeds.items()}, **{k: np.shape(v) for k, v in values.items()}}
    return [describe_call(node, shapes[t[0]], shapes[t[1]], shapes[t[2]], _elem_bytes(model, t[0]))
            for node, t in calls]
