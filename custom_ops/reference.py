"""Numpy reference implementations of the ``ai.onnxft`` operators (see ``functions.py``).

Written from the operators' contract, not from their function bodies: ``FlipBits_*`` XORs bit
patterns element by element, and ``GemmFaults_*`` / ``ConvFaults_*`` recompute every faulted
output element *sequentially* — one product and one partial sum at a time, in execution order,
flipping the chosen bits of the chosen operation result as it goes — and add the difference
between that faulty run and a fault-free run of the same element to ``Y``. The ONNX functions
instead vectorise over faults (clean ``CumSum`` table plus a chained per-element change), so the
two agree exactly for integers and within float rounding for floats.

Every function takes the operator's inputs in the operator's order and returns ``(Z, log)``
where ``log`` is ``[F, 2]`` float64: (value before the flip, value after it), one row per fault in
input order. ``REFERENCES`` maps each operator name to its implementation.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

__all__ = ["flip_bits", "gemm_faults", "REFERENCES"]

_UINT = {
    np.dtype(np.float32): np.uint32,
    np.dtype(np.float16): np.uint16,
    np.dtype(np.int8): np.uint8,
    np.dtype(np.uint8): np.uint8,
}


def _xor_bits(value, mask, dtype):
    """``value`` (a scalar of ``dtype``) with the bits of ``mask`` flipped."""
    dtype = np.dtype(dtype)
    u = _UINT[dtype]
    width = dtype.itemsize * 8
    arr = np.array([value], dtype=dtype)
    arr.view(u)[0] ^= u(int(mask) % (1 << width))
    return arr[0]


def flip_bits(Y, index, mask):
    """``FlipBits_<dtype>``: XOR ``mask[f]`` into element ``index[f]`` of the flattened ``Y``."""
    Y = np.asarray(Y)
    if Y.dtype not in _UINT:
        raise TypeError(f"FlipBits supports float32, float16, int8 and uint8, not {Y.dtype}")
    flat = Y.reshape(-1).copy()
    index = np.asarray(index, np.int64).reshape(-1)
    mask = np.asarray(mask).reshape(-1)
    if len(index) != len(mask):
        raise ValueError("index and mask differ in length")
    idx = np.where(index < 0, index + flat.size, index)
    if len(np.unique(idx)) != len(idx):
        raise ValueError("FlipBits indices must be unique")
    log = np.zeros((len(idx), 2), np.float64)
    for f, (i, m) in enumerate(zip(idx.tolist(), mask.tolist())):
        before = flat[i]
        after = _xor_bits(before, m, flat.dtype)
        flat[i] = after
        log[f] = (float(before), float(after))
    return flat.reshape(Y.shape), log


def _signed(x: int, width: int) -> int:
    return x - (1 << width) if x >= 1 << (width - 1) else x


def _flip_int(value: int, mask: int, width: int) -> int:
    """Flip the bits of ``mask`` of ``value`` seen in ``width``-bit two's complement (not wrapped)."""
    x = value % (1 << width)
    return value + _signed(x ^ mask, width) - _signed(x, width)


def _op_time(column: int, k: int) -> int:
    """Execution order inside one element for a table column: p0, s0, p1, s1, ..., bias."""
    if column < k:
        return 2 * column
    if column < 2 * k:
        return 2 * (column - k) + 1
    return 2 * k


def gemm_faults(fmt, A, B, Y, a_base, a_off, b_base, b_off, out_index, column, is_sum, mask, prev,
                rank, rounds, channel, conv=None, quant=None):
    """``GemmFaults_<fmt>`` (``conv=None``) / ``ConvFaults_<fmt>`` (``conv=(bias, ih0, iw0, dh, dw)``).

    ``quant=(za, zb, sa, sb, width_mask)`` for ``fmt == "int"``. Column ``c`` of a fault names an
    operation of output element ``out_index``: ``c < K`` product ``p_c``, ``K <= c < 2K`` partial
    sum ``s_{c-K}``, ``c == 2K`` the bias add (convolutions). Faults of one element are applied in
    ``rank`` order, which must be their execution order.
    """
    if fmt not in ("fp32", "fp16", "int"):
        raise ValueError(f"unknown format {fmt!r}")
    if (fmt == "int") != (quant is not None):
        raise ValueError("quant parameters are required exactly for fmt='int'")
    A, B, Y = np.asarray(A), np.asarray(B), np.asarray(Y)
    a_flat, b_flat = A.reshape(-1), B.reshape(-1)
    a_base = None if a_base is None else np.asarray(a_base, np.int64).reshape(-1)
    b_base = None if b_base is None else np.asarray(b_base, np.int64).reshape(-1)
    a_off = None if a_off is None else np.asarray(a_off, np.int64).reshape(-1)
    b_off = None if b_off is None else np.asarray(b_off, np.int64).reshape(-1)
    out_index = np.asarray(out_index, np.int64).reshape(-1)
    column = np.asarray(column, np.int64).reshape(-1)
    is_sum = np.asarray(is_sum, bool).reshape(-1)
    mask = np.asarray(mask).astype(np.int64).reshape(-1)
    prev = np.asarray(prev, np.int64).reshape(-1)
    rank = np.asarray(rank, np.int64).reshape(-1)
    channel = np.asarray(channel, np.int64).reshape(-1)
    F, K = len(out_index), (None if b_off is None else len(b_off))
    if a_off is not None and len(a_off) != K:
        raise ValueError("a_off and b_off differ in length")
    if F and int(np.asarray(rounds)) < int(rank.max()) + 1:
        raise ValueError("rounds must cover every rank")
    a_index = None
    if conv is not None and len(conv) == 3:  # ConvGatherFaults: (bias, a_index, b_index [F, K]; -1 = zero)
        bias, a_index, b_index = conv
        bias = np.asarray(bias).reshape(-1)
        a_index = np.asarray(a_index, np.int64).reshape(F, -1)
        b_index = np.asarray(b_index, np.int64).reshape(F, -1)
        K = a_index.shape[1]
    elif conv is not None:
        bias, ih0, iw0, dh, dw = conv
        bias = np.asarray(bias).reshape(-1)
        ih0 = np.asarray(ih0, np.int64).reshape(-1)
        iw0 = np.asarray(iw0, np.int64).reshape(-1)
        dh, dw = np.asarray(dh, np.int64).reshape(-1), np.asarray(dw, np.int64).reshape(-1)
        height, width = A.shape[2], A.shape[3]
    if quant is not None:
        za, zb, sa, sb, width_mask = quant
        za = int(np.asarray(za).reshape(-1)[0])
        zb = np.asarray(zb).astype(np.int64).reshape(-1)
        sa = np.float32(np.asarray(sa, np.float32).reshape(-1)[0])
        sb = np.asarray(sb, np.float32).reshape(-1)
        width_mask = np.asarray(width_mask, np.int64).reshape(-1)

    # Group the faults by output element; check the chain (prev, rank) against execution order.
    groups = defaultdict(list)
    for f in range(F):
        groups[int(out_index[f])].append(f)
    for o, fs in groups.items():
        fs.sort(key=lambda f: rank[f])
        if [int(rank[f]) for f in fs] != list(range(len(fs))):
            raise ValueError(f"ranks of element {o} are not 0..{len(fs) - 1}")
        if [int(prev[f]) for f in fs] != [F] + fs[:-1]:
            raise ValueError(f"prev chain of element {o} is inconsistent")
        times = [_op_time(int(column[f]), K) for f in fs]
        if times != sorted(times):
            raise ValueError(f"faults of element {o} are not ranked in execution order")
        for f in fs:
            c = int(column[f])
            if not 0 <= c < (2 * K + 1 if conv is not None else 2 * K):
                raise ValueError(f"column {c} out of range")
            if bool(is_sum[f]) != (c >= K):
                raise ValueError(f"is_sum of fault {f} disagrees with its column {c}")
            for other in fs:
                if other != f and int(channel[other]) != int(channel[f]):
                    raise ValueError(f"faults of element {o} disagree on the channel")

    log = np.zeros((F, 2), np.float64)
    Z = Y.copy()
    z_flat = Z.reshape(-1)
    for o, fs in groups.items():
        f0 = fs[0]
        ch = int(channel[f0])
        a_idx = a_base[f0] + a_off if a_index is None else np.maximum(a_index[f0], 0)
        valid = np.ones(K, bool) if a_index is None else a_index[f0] >= 0
        if conv is not None and a_index is None:
            ih, iw = ih0[f0] + dh, iw0[f0] + dw
            valid = (ih >= 0) & (ih < height) & (iw >= 0) & (iw < width)
        a_vals = [a_flat[i] if v else None for i, v in zip(a_idx.tolist(), valid.tolist())]
        b_vals = b_flat[b_base[f0] + b_off] if a_index is None else b_flat[b_index[f0]]
        by_column = defaultdict(list)
        for f in fs:
            by_column[int(column[f])].append(f)

        if fmt == "int":
            zbc = int(zb[ch % len(zb)])
            prods = [0 if a is None else (int(a) - za) * (int(b) - zbc) for a, b in zip(a_vals, b_vals)]
            add = lambda s, v: s + v  # noqa: E731

            def flip(value, f, c):
                w = int(width_mask[f]).bit_length()
                return _flip_int(value, int(mask[f]), w)
            bias_v = None if conv is None else int(bias[ch % len(bias)])
        else:
            prods = []
            for a, b in zip(a_vals, b_vals):
                a32 = np.float32(0.0) if a is None else np.float32(a)
                p = a32 * np.float32(b)
                prods.append(np.float32(np.float16(p)) if fmt == "fp16" else p)
            add = lambda s, v: np.float32(np.float32(s) + np.float32(v))  # noqa: E731

            def flip(value, f, c):
                if fmt == "fp16" and c < K:  # an fp16 product: a 16-bit pattern
                    return np.float32(_xor_bits(np.float16(value), int(mask[f]), np.float16))
                return _xor_bits(np.float32(value), int(mask[f]), np.float32)
            bias_v = None if conv is None else np.float32(bias[ch % len(bias)])

        def run(faulty: bool):
            def at(c, value):
                if faulty:
                    for f in by_column.get(c, ()):
                        new = flip(value, f, c)
                        log[f] = (float(value), float(new))
                        value = new
                return value
            s = None
            for k, p in enumerate(prods):
                p = at(k, p)
                s = p if k == 0 else add(s, p)
                s = at(K + k, s)
            if bias_v is not None:
                s = at(2 * K, add(s, bias_v))
            return s

        with np.errstate(all="ignore"):
            clean, faulty = run(False), run(True)
            if fmt == "int":
                change = np.float32(faulty - clean) * (sa * sb[ch % len(sb)])
            else:
                change = np.float32(faulty) - np.float32(clean)
            z_flat[o] = (np.float32(z_flat[o]) + np.float32(change)).astype(Z.dtype)  # added in float32
    return Z, log


def _flip_ref(name):
    def fn(Y, faults):
        faults = np.asarray(faults, np.int64).reshape(-1, 2)
        return flip_bits(Y, faults[:, 0], faults[:, 1])
    fn.__name__ = name
    return fn


def _columns(faults, names):
    faults = np.asarray(faults, np.int64).reshape(-1, len(names))
    return {n: faults[:, i] for i, n in enumerate(names)}


def _gather_ref(fmt):
    """Reference of ConvGatherFaults_* (the K input indices of each fault given whole)."""
    from .functions import table_columns

    is_int = fmt == "int"

    def fn(*inputs):
        A, B, Y, faults, a_index, b_index, bias = (np.asarray(v) for v in inputs[:7])
        c = _columns(faults, table_columns(True, is_int, gathered=True))
        rest = [c["out_index"], c["column"], c["is_sum"].astype(bool), c["mask"], c["prev"], c["rank"],
                np.int64(c["rank"].max() + 1 if len(c["rank"]) else 0), c["channel"]]
        q = tuple(inputs[7:11]) + (c["width_mask"],) if is_int else None
        return gemm_faults(fmt, A, B, Y, None, None, None, None, *rest, conv=(bias, a_index, b_index), quant=q)
    fn.__name__ = f"ConvGatherFaults_{fmt}"
    return fn


def _gemm_ref(fmt, conv=False, batched=False, b_transposed=False):
    """Reference of ConvFaults_* (index-based operands), (Batched)GemmFaults_* and GemmFaultsBT_*
    (row gathers; GemmFaultsBT_* takes B^T [N, K] as its second input)."""
    from .functions import table_columns

    is_int = fmt == "int"

    def fn(*inputs):
        A, B, Y, faults = (np.asarray(v) for v in inputs[:4])
        c = _columns(faults, table_columns(conv, is_int))
        rest = [c["out_index"], c["column"], c["is_sum"].astype(bool), c["mask"], c["prev"], c["rank"],
                np.int64(c["rank"].max() + 1 if len(c["rank"]) else 0), c["channel"]]
        q = None
        if conv:
            a_off, b_off, dh, dw, bias = inputs[4:9]
            if is_int:
                q = tuple(inputs[9:13]) + (c["width_mask"],)
            return gemm_faults(fmt, A, B, Y, c["a_base"][:, None], a_off, c["b_base"][:, None], b_off, *rest,
                               conv=(bias, c["ih0"][:, None], c["iw0"][:, None], dh, dw), quant=q)
        if is_int:
            q = tuple(inputs[4:8]) + (c["width_mask"],)
        k = A.shape[-1]
        a_base, a_off = c["a_row"] * k, np.arange(k, dtype=np.int64)
        if b_transposed:  # the second input is B^T [N, K]
            B = np.ascontiguousarray(np.swapaxes(B, -1, -2))
        if batched:  # rows of B^T viewed [-1, K]
            B = np.ascontiguousarray(np.swapaxes(B, -1, -2))
            b_base, b_off = c["b_col"] * k, np.arange(k, dtype=np.int64)
        else:  # column n of B [K, N]
            b_base, b_off = c["b_col"], np.arange(k, dtype=np.int64) * B.shape[-1]
        return gemm_faults(fmt, A, B, Y, a_base, a_off, b_base, b_off, *rest, quant=q)
    fn.__name__ = ("Conv" if conv else "BatchedGemm" if batched else "Gemm") + (
        "FaultsBT_" if b_transposed else "Faults_") + fmt
    return fn


REFERENCES = {f"FlipBits_{d}": _flip_ref(f"FlipBits_{d}") for d in ("float32", "float16", "int8", "uint8")}
REFERENCES.update({f"ConvFaults_{f}": _gemm_ref(f, conv=True) for f in ("fp32", "fp16", "int")})
REFERENCES.update({f"ConvGatherFaults_{f}": _gather_ref(f) for f in ("fp32", "fp16", "int")})
REFERENCES.update({("BatchedGemm" if bt else "Gemm") + f"Faults_{f}": _gemm_ref(f, batched=bt)
                   for f in ("fp32", "fp16", "int") for bt in (False, True)})
REFERENCES.update({f"GemmFaultsBT_{f}": _gemm_ref(f, b_transposed=True) for f in ("fp32", "fp16", "int")})
# The NoLog variants compute the same Z (they only lack the log output).
REFERENCES.update({name.replace("_", "NoLog_", 1): fn for name, fn in list(REFERENCES.items())})
