"""Dense, deliberately naive reference interpreter for the onnxft fault model.

This module is the independent oracle that the tests compare the real injection graphs
against.  It follows ``docs/fault_model.md`` literally: every multiply and every add of a
gemm site is executed one at a time, as a numpy / Python scalar, in the documented order,
and faults are applied to exactly the operation result they name.  It is meant for tiny
shapes (a few hundred outputs, K of a few dozen) and makes no attempt to be fast.

Fault tuples
------------
* gemm sites (MatMul, Conv): ``(element, step, bit)``
* elementwise sites: ``(element, bit)``

``element`` is the flat (row-major) index into the WHOLE output tensor, batch axis included;
a caller holding the sampler's item-relative ``(item, element)`` converts it first, e.g. with
:func:`flat_element`.

Steps of one output element with reduction length ``K``:

* ``t = 0 .. K-1``      product ``p_t``
* ``t = K .. 2K-2``     partial sum ``s_j`` with ``j = t - K + 1`` (``s_0 = p_0`` is not an operation)
* ``t = 2K-1``          bias add ``s_K = s_{K-1} + bias`` (Conv with a bias only)

Formats (``fmt``):

* ``"fp32"``: operands float32; products and sums are float32 scalars; every result has 32 bits.
* ``"fp16"``: operands float16; each product is computed exactly and rounded once to float16
  (16 bits); it is then widened (exactly) to float32 and accumulated in float32 (32 bits).
  A Conv bias is taken as a float16 tensor and widened to float32 for the bias add.
* integer gemm (``matmul_int_reference`` / ``conv_int_reference``): products
  ``(qa - za) * (qb - zb)`` and sums are unbounded Python ints; flips use ``product_bits`` /
  ``accum_bits`` with the two's complement rule of the doc (values are never wrapped).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

__all__ = [
    "flip_float",
    "flip_int",
    "apply_flips",
    "flat_element",
    "matmul_reference",
    "matmul_int_reference",
    "conv_reference",
    "conv_int_reference",
    "elementwise_reference",
]

_FLOAT_UINT = {np.dtype(np.float32): np.uint32, np.dtype(np.float16): np.uint16}
_FMT_DTYPE = {"fp32": np.float32, "fp16": np.float16}


# --------------------------------------------------------------------------------------
# single-value flips
# --------------------------------------------------------------------------------------


def flip_float(value, bit, dtype):
    """Return ``value`` (as ``dtype``: np.float32 or np.float16) with IEEE bit ``bit`` XORed.

    Bit 0 is the least significant mantissa bit, bit 31 (float32) / 15 (float16) the sign.
    The result is a numpy scalar of ``dtype``; Inf and NaN results are returned as they are.
    """
    dtype = np.dtype(dtype)
    if dtype not in _FLOAT_UINT:
        raise TypeError(f"flip_float supports float32 and float16, not {dtype}")
    width = dtype.itemsize * 8
    bit = int(bit)
    if not 0 <= bit < width:
        raise ValueError(f"bit {bit} out of range for {dtype} ({width} bits)")
    arr = np.array([value], dtype=dtype)
    arr.view(_FLOAT_UINT[dtype])[0] ^= _FLOAT_UINT[dtype](1 << bit)
    return arr[0]


def flip_int(value, bit, width):
    """Flip bit ``bit`` of the Python int ``value`` seen in ``width``-bit two's complement.

    For ``bit < width-1``: adds ``-2**bit`` if that bit of ``value mod 2**width`` is 1, else
    ``+2**bit``.  For the sign bit ``width-1``: adds ``+2**(width-1)`` if it is set, else
    ``-2**(width-1)``.  The value itself is never wrapped into the width's range.
    """
    value = int(value)
    bit = int(bit)
    width = int(width)
    if width < 1:
        raise ValueError(f"width must be positive, got {width}")
    if not 0 <= bit < width:
        raise ValueError(f"bit {bit} out of range for width {width}")
    is_set = (value % (1 << width)) >> bit & 1
    if bit < width - 1:
        return value - (1 << bit) if is_set else value + (1 << bit)
    return value + (1 << bit) if is_set else value - (1 << bit)


def _kind_width(kind):
    if isinstance(kind, str):
        if kind == "fp32":
            return 32
        if kind == "fp16":
            return 16
        raise ValueError(f"unknown kind {kind!r}")
    return int(kind)


def apply_flips(value, bits, kind):
    """Flip every bit in ``bits`` of one operation result.

    ``kind`` is ``"fp32"`` (value becomes a np.float32), ``"fp16"`` (np.float16) or an int
    width ``w`` (value is a Python int, flipped with :func:`flip_int`).  The flips are applied
    one after another; distinct bits commute, so this is "flip all of them".  (A bit listed
    twice cancels out; the sampler never produces that.)
    """
    if isinstance(kind, str):
        dtype = _FMT_DTYPE.get(kind)
        if dtype is None:
            raise ValueError(f"unknown kind {kind!r}")
        out = dtype(value) if not isinstance(value, dtype) else value
        for b in bits:
            out = flip_float(out, b, dtype)
        return out
    out = int(value)
    for b in bits:
        out = flip_int(out, b, kind)
    return out


def flat_element(item, element, output_shape):
    """Convert the sampler's ``(item, element-within-item)`` to a flat whole-tensor index."""
    per_item = int(np.prod(output_shape[1:], dtype=np.int64))
    if not 0 <= element < per_item:
        raise ValueError(f"element {element} out of range for item size {per_item}")
    return int(item) * per_item + int(element)


# --------------------------------------------------------------------------------------
# fault bookkeeping
# --------------------------------------------------------------------------------------


def _group_gemm_faults(faults, n_out, K, has_bias, prod_kind, acc_kind):
    """Validate gemm faults and group them as {element: {step: [bits...]}}."""
    n_steps = 2 * K if has_bias else 2 * K - 1
    grouped = defaultdict(lambda: defaultdict(list))
    for fault in faults:
        if len(fault) != 3:
            raise ValueError(f"gemm fault must be (element, step, bit), got {fault!r}")
        element, step, bit = (int(v) for v in fault)
        if not 0 <= element < n_out:
            raise ValueError(f"element {element} out of range [0, {n_out})")
        if not 0 <= step < n_steps:
            raise ValueError(f"step {step} out of range [0, {n_steps}) (K={K}, bias={has_bias})")
        width = _kind_width(prod_kind if step < K else acc_kind)
        if not 0 <= bit < width:
            raise ValueError(f"bit {bit} out of range for step {step} ({width} bits)")
        grouped[element][step].append(bit)
    return grouped


class _FloatArith:
    """Scalar arithmetic of the fp32 / fp16 gemm formats."""

    def __init__(self, fmt):
        if fmt not in _FMT_DTYPE:
            raise ValueError(f"fmt must be 'fp32' or 'fp16', got {fmt!r}")
        self.fmt = fmt
        self.operand_dtype = _FMT_DTYPE[fmt]
        self.prod_kind = fmt
        self.acc_kind = "fp32"

    def mul(self, x, y):
        if self.fmt == "fp32":
            return np.float32(x) * np.float32(y)  # float32 * float32, rounded once to float32
        # binary16 operands: the float32 product is exact (11+11 significand bits, exponent
        # range well inside binary32), so converting it to float16 rounds exactly once.
        return np.float16(np.float32(x) * np.float32(y))

    def to_acc(self, p):
        return np.float32(p)  # float16 -> float32 is exact

    def add(self, s, v):
        return np.float32(s) + np.float32(v)


class _IntArith:
    """Integer gemm arithmetic: unbounded Python ints, flips at the given widths."""

    def __init__(self, product_bits, accum_bits):
        self.prod_kind = int(product_bits)
        self.acc_kind = int(accum_bits)

    def mul(self, x, y):
        return int(x) * int(y)

    def to_acc(self, p):
        return int(p)

    def add(self, s, v):
        return int(s) + int(v)


def _dot(pairs, K, steps, arith, bias=None):
    """One output element: K products, K-1 partial sums, optional bias add, with faults.

    ``pairs`` yields the K operand pairs in reduction order; ``steps`` maps step -> bits.
    """
    s = None
    n = 0
    for k, (x, y) in enumerate(pairs):
        p = arith.mul(x, y)  # step k: product p_k
        p = apply_flips(p, steps.get(k, ()), arith.prod_kind)
        if k == 0:
            s = arith.to_acc(p)  # s_0 = p_0 is not an operation of its own
        else:
            s = arith.add(s, arith.to_acc(p))  # step K-1+k: partial sum s_k
            s = apply_flips(s, steps.get(K - 1 + k, ()), arith.acc_kind)
        n += 1
    if n != K:
        raise AssertionError(f"expected {K} products, got {n}")
    if bias is not None:
        s = arith.add(s, bias)  # step 2K-1: bias add s_K
        s = apply_flips(s, steps.get(2 * K - 1, ()), arith.acc_kind)
    return s


# --------------------------------------------------------------------------------------
# MatMul
# --------------------------------------------------------------------------------------


def _matmul_shapes(a, b):
    """Promote 1-D operands like np.matmul; return (a3, b3, batch, M, K, N, out_shape)."""
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError("matmul operands must be at least 1-D")
    a_vec, b_vec = a.ndim == 1, b.ndim == 1
    a2 = a[None, :] if a_vec else a
    b2 = b[:, None] if b_vec else b
    M, K = a2.shape[-2:]
    K2, N = b2.shape[-2:]
    if K != K2:
        raise ValueError(f"inner dimensions differ: {a.shape} @ {b.shape}")
    if K < 1:
        raise ValueError("K must be at least 1")
    batch = np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    a3 = np.broadcast_to(a2, batch + (M, K))
    b3 = np.broadcast_to(b2, batch + (K, N))
    out_shape = batch + ((() if a_vec else (M,)) + (() if b_vec else (N,)))
    # Dropping a size-1 M or N axis does not change the row-major flat order, so flat
    # element indices into out_shape equal those into batch + (M, N).
    return a3, b3, batch, M, K, N, out_shape


def _matmul_loop(a3, b3, batch, M, K, N, grouped, arith, out_dtype):
    out = np.zeros(batch + (M, N), dtype=out_dtype)
    flat = out.reshape(-1)
    e = 0
    for bidx in np.ndindex(*batch):
        for m in range(M):
            for n in range(N):
                pairs = ((a3[bidx + (m, k)], b3[bidx + (k, n)]) for k in range(K))
                flat[e] = _dot(pairs, K, grouped.get(e, {}), arith)
                e += 1
    return out


def matmul_reference(a, b, faults, fmt):
    """Faulty ``a @ b`` computed one scalar operation at a time.

    a: [..., M, K], b: [..., K, N] (batch axes broadcast as in np.matmul; 1-D operands are
    promoted like np.matmul).  ``faults``: iterable of ``(element, step, bit)`` with
    ``element`` a flat index into the whole output.  ``fmt``: "fp32" or "fp16" (operands are
    cast to float16, products rounded to float16 and flipped with bits 0..15, partial sums in
    float32 with bits 0..31).  Returns a float32 array of np.matmul's output shape.
    """
    arith = _FloatArith(fmt)
    a = np.asarray(a).astype(arith.operand_dtype)
    b = np.asarray(b).astype(arith.operand_dtype)
    a3, b3, batch, M, K, N, out_shape = _matmul_shapes(a, b)
    n_out = int(np.prod(batch, dtype=np.int64)) * M * N
    grouped = _group_gemm_faults(faults, n_out, K, False, arith.prod_kind, arith.acc_kind)
    with np.errstate(all="ignore"):
        out = _matmul_loop(a3, b3, batch, M, K, N, grouped, arith, np.float32)
    return out.reshape(out_shape)


def _centered(q, z, axis_len=None, name="zero point"):
    """(q - z) as an int64 array; z scalar or a vector broadcast along the last axis."""
    q = np.asarray(q)
    if q.dtype not in (np.dtype(np.int8), np.dtype(np.uint8)):
        raise TypeError(f"quantized operand must be int8 or uint8, got {q.dtype}")
    z = np.asarray(z, dtype=np.int64)
    if z.ndim > 1 or (z.ndim == 1 and axis_len is not None and z.shape[0] != axis_len):
        raise ValueError(f"{name} must be a scalar or a vector of length {axis_len}")
    return q.astype(np.int64), z


def matmul_int_reference(qa, za, qb, zb, faults, product_bits=16, accum_bits=32):
    """Faulty integer MatMul of a QDQ model: sum_k (qa-za)*(qb-zb), one op at a time.

    qa: int8/uint8 [..., M, K]; za: scalar zero point; qb: int8/uint8 [..., K, N]; zb: scalar
    or per-output-column vector of length N.  Products are flipped at ``product_bits``,
    partial sums at ``accum_bits``.  Returns the int64 accumulator array (np.matmul's shape).
    """
    qa64, za = _centered(qa, za, None, "za")
    if za.ndim != 0:
        raise ValueError("za must be a scalar")
    qb = np.asarray(qb)
    N_len = qb.shape[-1] if qb.ndim >= 2 else None
    qb64, zb = _centered(qb, zb, N_len, "zb")
    if zb.ndim == 1 and qb.ndim < 2:
        raise ValueError("a per-column zb needs a 2-D (or batched) qb")
    ca = qa64 - za
    cb = qb64 - zb  # a vector zb broadcasts along the last (N) axis
    arith = _IntArith(product_bits, accum_bits)
    a3, b3, batch, M, K, N, out_shape = _matmul_shapes(ca, cb)
    n_out = int(np.prod(batch, dtype=np.int64)) * M * N
    grouped = _group_gemm_faults(faults, n_out, K, False, arith.prod_kind, arith.acc_kind)
    out = _matmul_loop(a3, b3, batch, M, K, N, grouped, arith, np.int64)
    return out.reshape(out_shape)


# --------------------------------------------------------------------------------------
# Conv (2-D, NCHW)
# --------------------------------------------------------------------------------------


def _conv_params(x_shape, w_shape, strides, pads, dilations, group):
    if len(x_shape) != 4 or len(w_shape) != 4:
        raise ValueError("conv_reference supports 2-D NCHW convolution only")
    strides = (1, 1) if strides is None else tuple(int(s) for s in strides)
    pads = (0, 0, 0, 0) if pads is None else tuple(int(p) for p in pads)
    dilations = (1, 1) if dilations is None else tuple(int(d) for d in dilations)
    group = int(group)
    Nb, C, H, W = x_shape
    M, Cg, kH, kW = w_shape
    if C != Cg * group or M % group != 0:
        raise ValueError(f"bad group {group} for x {x_shape}, w {w_shape}")
    top, left, bottom, right = pads
    sh, sw = strides
    dh, dw = dilations
    OH = (H + top + bottom - dh * (kH - 1) - 1) // sh + 1
    OW = (W + left + right - dw * (kW - 1) - 1) // sw + 1
    if OH < 1 or OW < 1:
        raise ValueError("empty convolution output")
    return Nb, C, H, W, M, Cg, kH, kW, OH, OW, (top, left, bottom, right), (sh, sw), (dh, dw), group


def _conv_loop(xp, w, bias, params, grouped, arith, out_dtype):
    """xp: explicitly zero-padded input operand, w: weight operand (already centered/cast)."""
    Nb, C, H, W, M, Cg, kH, kW, OH, OW, pads, (sh, sw), (dh, dw), group = params
    K = Cg * kH * kW
    m_per_group = M // group
    out = np.zeros((Nb, M, OH, OW), dtype=out_dtype)
    flat = out.reshape(-1)
    e = 0
    for n in range(Nb):
        for m in range(M):
            g = m // m_per_group
            for oh in range(OH):
                for ow in range(OW):
                    # reduction index k over w[m]'s [Cg, kH, kW] block, row-major
                    pairs = (
                        (xp[n, g * Cg + c, oh * sh + i * dh, ow * sw + j * dw], w[m, c, i, j])
                        for c in range(Cg)
                        for i in range(kH)
                        for j in range(kW)
                    )
                    b = None if bias is None else bias[m]
                    flat[e] = _dot(pairs, K, grouped.get(e, {}), arith, b)
                    e += 1
    return out


def _pad_nchw(x, pads, fill):
    top, left, bottom, right = pads
    return np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=fill)


def conv_reference(x, w, bias, strides, pads, dilations, group, faults, fmt):
    """Faulty 2-D NCHW Conv computed one scalar operation at a time.

    x: [N, C, H, W]; w: [M, C/group, kH, kW]; bias: [M] or None; strides [sh, sw];
    pads [top, left, bottom, right] (ONNX order); dilations [dh, dw] (None = defaults).
    Padded positions are real products ``0 * w`` (+0.0 padding).  With a bias, step 2K-1 is
    the bias add.  ``fmt`` as in :func:`matmul_reference` (fp16: x, w and bias are cast to
    float16; the bias is widened to float32 for the float32 bias add).  Returns float32.
    """
    arith = _FloatArith(fmt)
    x = np.asarray(x).astype(arith.operand_dtype)
    w = np.asarray(w).astype(arith.operand_dtype)
    params = _conv_params(x.shape, w.shape, strides, pads, dilations, group)
    Nb, C, H, W, M, Cg, kH, kW, OH, OW = params[:10]
    K = Cg * kH * kW
    if bias is not None:
        bias = np.asarray(bias).astype(arith.operand_dtype).astype(np.float32)
        if bias.shape != (M,):
            raise ValueError(f"bias must have shape ({M},), got {bias.shape}")
    grouped = _group_gemm_faults(
        faults, Nb * M * OH * OW, K, bias is not None, arith.prod_kind, arith.acc_kind
    )
    xp = _pad_nchw(x, params[10], arith.operand_dtype(0))
    with np.errstate(all="ignore"):
        return _conv_loop(xp, w, bias, params, grouped, arith, np.float32)


def conv_int_reference(qx, zx, qw, zw, bias_int, strides, pads, dilations, group, faults,
                       product_bits=16, accum_bits=32):
    """Faulty integer Conv of a QDQ model: products (qx-zx)*(qw-zw[m]), integer sums.

    qx: int8/uint8 [N, C, H, W], zx scalar; qw: int8/uint8 [M, C/group, kH, kW], zw scalar
    or per-output-channel vector [M]; bias_int: int32 [M] or None (added at step 2K-1).
    Padded positions hold the real value 0, i.e. (qx - zx) = 0 there, and are real
    products.  Returns the int64 accumulator array [N, M, OH, OW].
    """
    qx64, zx = _centered(qx, zx, None, "zx")
    if zx.ndim != 0:
        raise ValueError("zx must be a scalar")
    qw = np.asarray(qw)
    qw64, zw = _centered(qw, zw, qw.shape[0] if qw.ndim else None, "zw")
    cx = qx64 - zx
    cw = qw64 - (zw.reshape(-1, 1, 1, 1) if zw.ndim == 1 else zw)
    params = _conv_params(cx.shape, cw.shape, strides, pads, dilations, group)
    Nb, C, H, W, M, Cg, kH, kW, OH, OW = params[:10]
    K = Cg * kH * kW
    arith = _IntArith(product_bits, accum_bits)
    if bias_int is not None:
        bias_int = np.asarray(bias_int)
        if bias_int.shape != (M,):
            raise ValueError(f"bias must have shape ({M},), got {bias_int.shape}")
        bias_int = [int(v) for v in bias_int]
    grouped = _group_gemm_faults(
        faults, Nb * M * OH * OW, K, bias_int is not None, arith.prod_kind, arith.acc_kind
    )
    xp = _pad_nchw(cx, params[10], 0)
    return _conv_loop(xp, cw, bias_int, params, grouped, arith, np.int64)


# --------------------------------------------------------------------------------------
# elementwise
# --------------------------------------------------------------------------------------


def elementwise_reference(y, faults, fmt):
    """Flip bits of elements of an already computed output tensor (one op per element).

    ``faults``: iterable of ``(element, bit)`` with ``element`` a flat whole-tensor index.
    ``fmt``: "fp32" (y cast to float32, bits 0..31), "fp16" (float16, bits 0..15) or "int8"
    (y must be int8 or uint8; bits 0..7, XOR of the 8-bit pattern — for int8 this is the
    doc's two's complement rule).  Returns a new array of the same shape and format dtype.
    """
    if fmt in _FMT_DTYPE:
        out = np.array(y, dtype=_FMT_DTYPE[fmt], copy=True)
    elif fmt == "int8":
        out = np.array(y, copy=True)
        if out.dtype not in (np.dtype(np.int8), np.dtype(np.uint8)):
            raise TypeError(f"int8 elementwise output must be int8 or uint8, got {out.dtype}")
    else:
        raise ValueError(f"fmt must be 'fp32', 'fp16' or 'int8', got {fmt!r}")
    width = out.dtype.itemsize * 8
    bits = out.reshape(-1).view({32: np.uint32, 16: np.uint16, 8: np.uint8}[width])
    for fault in faults:
        if len(fault) != 2:
            raise ValueError(f"elementwise fault must be (element, bit), got {fault!r}")
        element, bit = int(fault[0]), int(fault[1])
        if not 0 <= element < out.size:
            raise ValueError(f"element {element} out of range [0, {out.size})")
        if not 0 <= bit < width:
            raise ValueError(f"bit {bit} out of range for {fmt} ({width} bits)")
        bits[element] ^= bits.dtype.type(1 << bit)
    return out


# --------------------------------------------------------------------------------------
# Conv of any spatial rank, grouped, and ConvTranspose (the gathered convolutions)
# --------------------------------------------------------------------------------------


def _conv_nd_geometry(x_shape, w_shape, strides, pads, dilations, group, transpose, output_padding):
    d = len(x_shape) - 2
    strides = [1] * d if strides is None else [int(v) for v in strides]
    pads = [0] * (2 * d) if pads is None else [int(v) for v in pads]
    dilations = [1] * d if dilations is None else [int(v) for v in dilations]
    output_padding = [0] * d if output_padding is None else [int(v) for v in output_padding]
    group = int(group)
    Nb, C = x_shape[:2]
    kernel = tuple(w_shape[2:])
    if C % group:
        raise ValueError(f"bad group {group} for {C} input channels")
    Cg = C // group
    if transpose:
        if w_shape[0] != C:
            raise ValueError("ConvTranspose weight must be [C_in, M/group, kernel...]")
        M = w_shape[1] * group
        out = [strides[i] * (x_shape[2 + i] - 1) + output_padding[i] + (kernel[i] - 1) * dilations[i] + 1
               - pads[i] - pads[d + i] for i in range(d)]
    else:
        if w_shape[1] != Cg or w_shape[0] % group:
            raise ValueError(f"bad group {group} for x {x_shape}, w {w_shape}")
        M = w_shape[0]
        out = [(x_shape[2 + i] + pads[i] + pads[d + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
               for i in range(d)]
    return Nb, C, Cg, M, kernel, tuple(out), strides, pads[:d], dilations


def _phase_taps(kernel, stride, dilation):
    """ConvTranspose, one axis: for each output phase r (o + pad_begin = r mod stride), the taps
    t with t * dilation = r (mod stride) in increasing order, padded with None (a zero product)
    to the longest phase."""
    rows = [[t for t in range(kernel) if (t * dilation) % stride == r] for r in range(stride)]
    n = max(1, max(len(r) for r in rows))
    return [r + [None] * (n - len(r)) for r in rows]


def _conv_nd_pairs(x, w, n, m, opos, geo, transpose, zero):
    """The K operand pairs of output element (n, m, opos) in the documented order: input channel
    of the group slowest, then the kernel taps row-major (ConvTranspose: the taps of the output's
    phase, those that meet an input position). Padding, and a missing tap of a ConvTranspose
    phase, is a real product with a zero operand."""
    Nb, C, Cg, M, kernel, out, strides, pb, dil = geo
    Mg = M // (C // Cg)
    g = m // Mg
    if transpose:
        per_axis = [_phase_taps(kernel[i], strides[i], dil[i])[(opos[i] + pb[i]) % strides[i]]
                    for i in range(len(kernel))]
    else:
        per_axis = [list(range(k)) for k in kernel]
    for c in range(Cg):
        for slot in np.ndindex(*[len(a) for a in per_axis]):
            tap = tuple(per_axis[i][j] for i, j in enumerate(slot))
            pos = []
            for i, k in enumerate(tap):
                if k is None:
                    pos.append(None)
                elif transpose:
                    num = opos[i] + pb[i] - k * dil[i]  # a multiple of the stride by the phase
                    pos.append(num // strides[i] if 0 <= num // strides[i] < x.shape[2 + i] else None)
                else:
                    p = opos[i] * strides[i] - pb[i] + k * dil[i]
                    pos.append(p if 0 <= p < x.shape[2 + i] else None)
            if None in pos:
                # a zero product 0 * w; w (which sets the sign of the zero) is the tap's weight, tap 0
                # on an axis whose phase has no tap in this slot
                wt = tuple(0 if k is None else k for k in tap)
                xv = zero
            else:
                wt, xv = tap, x[(n, g * Cg + c) + tuple(pos)]
            wv = w[(g * Cg + c, m - g * Mg) + wt] if transpose else w[(m, c) + wt]
            yield xv, wv


def _conv_nd_k(geo, transpose):
    Nb, C, Cg, M, kernel, out, strides, pb, dil = geo
    if not transpose:
        return Cg * int(np.prod(kernel))
    return Cg * int(np.prod([len(_phase_taps(kernel[i], strides[i], dil[i])[0]) for i in range(len(kernel))]))


def _conv_nd_loop(x, w, bias, geo, transpose, grouped, arith, out_dtype, zero, applied_to=None):
    Nb, C, Cg, M, kernel, out, *_ = geo
    K = _conv_nd_k(geo, transpose)
    result = np.zeros((Nb, M) + out, dtype=out_dtype)
    flat = result.reshape(-1)
    base = None if applied_to is None else np.asarray(applied_to).reshape(-1)
    e = 0
    for n in range(Nb):
        for m in range(M):
            for opos in np.ndindex(*out):
                pairs = _conv_nd_pairs(x, w, n, m, opos, geo, transpose, zero)
                b = None if bias is None else bias[m]
                if base is None:
                    flat[e] = _dot(pairs, K, grouped.get(e, {}), arith, b)
                else:
                    flat[e] = _dot_applied(pairs, K, grouped.get(e, {}), arith, b, base[e])
                e += 1
    return result


def conv_nd_reference(x, w, bias, strides, pads, dilations, group, faults, fmt, transpose=False,
                      output_padding=None, applied_to=None):
    """Faulty Conv of any spatial rank (1-D, 2-D, 3-D; grouped, depthwise) or ConvTranspose,
    computed one scalar operation at a time (docs/fault_model.md, "Convolutions").

    x: [N, C, *spatial]; w: Conv [M, C/group, *kernel] or ConvTranspose [C, M/group, *kernel];
    pads [begin..., end...] (ONNX order). Output element (n, m, o) reduces over (c, tap) in
    [C/group, *kernel] row-major (ConvTranspose: [C/group, *phase taps], see :func:`_phase_taps`).
    ``applied_to``: see :func:`matmul_applied_reference`."""
    arith = _FloatArith(fmt)
    x = np.asarray(x).astype(arith.operand_dtype)
    w = np.asarray(w).astype(arith.operand_dtype)
    geo = _conv_nd_geometry(x.shape, w.shape, strides, pads, dilations, group, transpose, output_padding)
    Nb, C, Cg, M, kernel, out = geo[:6]
    K = _conv_nd_k(geo, transpose)
    if bias is not None:
        bias = np.asarray(bias).astype(arith.operand_dtype).astype(np.float32)
    grouped = _group_gemm_faults(faults, Nb * M * int(np.prod(out)), K, bias is not None,
                                 arith.prod_kind, arith.acc_kind)
    with np.errstate(all="ignore"):
        return _conv_nd_loop(x, w, bias, geo, transpose, grouped, arith,
                             np.float32 if applied_to is None else np.asarray(applied_to).dtype,
                             arith.operand_dtype(0), applied_to)


def conv_nd_int_reference(qx, zx, qw, zw, bias_int, strides, pads, dilations, group, faults,
                          product_bits=16, accum_bits=32, transpose=False, output_padding=None):
    """Integer (QDQ) twin of :func:`conv_nd_reference`: products (qx-zx)*(qw-zw[m]), integer
    sums; zw is a scalar or a vector over output channels. Returns the int64 accumulators."""
    qx64, zx = _centered(qx, zx, None, "zx")
    qw = np.asarray(qw)
    m_axis = 1 if transpose else 0
    qw64, zw = _centered(qw, zw, None, "zw")
    if zw.ndim == 1 and transpose:
        raise ValueError("per-channel zero points of a ConvTranspose are not modelled")
    cx = qx64 - zx
    cw = qw64 - (zw.reshape((-1,) + (1,) * (qw.ndim - 1)) if zw.ndim == 1 and m_axis == 0 else zw)
    geo = _conv_nd_geometry(cx.shape, cw.shape, strides, pads, dilations, group, transpose, output_padding)
    Nb, C, Cg, M, kernel, out = geo[:6]
    K = _conv_nd_k(geo, transpose)
    arith = _IntArith(product_bits, accum_bits)
    if bias_int is not None:
        bias_int = [int(v) for v in np.asarray(bias_int)]
    grouped = _group_gemm_faults(faults, Nb * M * int(np.prod(out)), K, bias_int is not None,
                                 arith.prod_kind, arith.acc_kind)
    return _conv_nd_loop(cx, cw, bias_int, geo, transpose, grouped, arith, np.int64, 0)


# --------------------------------------------------------------------------------------
# float faults as the injection graph applies them (bit-exact comparisons)
# --------------------------------------------------------------------------------------


def _exec_time(step, K):
    """Execution order inside one output element: p_0, p_1, s_1, p_2, s_2, ..., bias add."""
    return max(2 * step - 1, 0) if step < K else 2 * (step - K + 1)


def _dot_applied(pairs, K, steps, arith, bias, base):
    """One output element as docs/fault_model.md ("Float faults, to the bit") specifies it: the
    clean products and sequential partial sums, each fault's change computed in binary32 in
    execution order, and the element's total change added once to ``base``, the clean output
    element computed by the runtime's kernel.

    D starts at -0 (x + (-0) == x for every x). A product fault: D = D + (flip(p) - p). A partial
    sum or bias add fault: v = s + D (the value after the earlier faults), D = flip(v) - s.
    Result: base + D in binary32, then rounded to base's type."""
    f32 = np.float32
    prods, sums = [], []
    for k, (x, y) in enumerate(pairs):
        p = arith.mul(x, y)
        prods.append(p)
        sums.append(arith.to_acc(p) if k == 0 else arith.add(sums[-1], arith.to_acc(p)))
    if len(prods) != K:
        raise AssertionError(f"expected {K} products, got {len(prods)}")
    if bias is not None:
        sums.append(arith.add(sums[-1], bias))  # sums[K]: the bias add
    change = f32(-0.0)
    for step in sorted(steps, key=lambda t: _exec_time(t, K)):
        bits = steps[step]
        if step < K:
            p = prods[step]
            flipped = apply_flips(p, bits, arith.prod_kind)
            change = f32(change + f32(f32(flipped) - f32(p)))
        else:
            s = sums[step - K + 1]
            v = f32(s + change)
            change = f32(apply_flips(v, bits, "fp32") - s)
    out = f32(f32(base) + change)
    return out.astype(np.asarray(base).dtype)


def matmul_applied_reference(a, b, faults, fmt, applied_to):
    """``a @ b`` with faults as the injection graph applies them (:func:`_dot_applied`):
    ``applied_to`` is the clean output computed by the runtime, to which each element's change
    is added once. Equal to the graph's output bit for bit; within rounding of
    :func:`matmul_reference` (the sequential semantics), which the tests check too."""
    arith = _FloatArith(fmt)
    a = np.asarray(a).astype(arith.operand_dtype)
    b = np.asarray(b).astype(arith.operand_dtype)
    a3, b3, batch, M, K, N, out_shape = _matmul_shapes(a, b)
    base = np.asarray(applied_to).reshape(-1)
    n_out = int(np.prod(batch, dtype=np.int64)) * M * N
    grouped = _group_gemm_faults(faults, n_out, K, False, arith.prod_kind, arith.acc_kind)
    out = np.zeros(n_out, dtype=base.dtype)
    e = 0
    with np.errstate(all="ignore"):
        for bidx in np.ndindex(*batch):
            for m in range(M):
                for n in range(N):
                    pairs = ((a3[bidx + (m, k)], b3[bidx + (k, n)]) for k in range(K))
                    out[e] = _dot_applied(pairs, K, grouped.get(e, {}), arith, None, base[e])
                    e += 1
    return out.reshape(np.asarray(applied_to).shape)
