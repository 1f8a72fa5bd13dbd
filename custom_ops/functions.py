"""The ``ai.onnxft`` operators, defined as ONNX functions of standard operators.

ONNX Runtime inlines model-local functions when it loads a model, so an injection graph that calls
these operators runs on stock onnxruntime (CPU or CUDA) with no native library. ``BitCast`` needs
default-domain opset 26, so injection graphs are upgraded to it.

Operators (``FAULT_DOMAIN``, version 1):

``FlipBits_<dtype>(Y, index, mask) -> Z``
    ``Z`` equals ``Y`` except that element ``index[f]`` of the flattened ``Y`` has the bits of
    ``mask[f]`` flipped (XOR on its bit pattern). Indices must be unique (the sampler merges the
    masks of faults on the same element). dtype: float32, float16, int8, uint8.

``GemmFaults_<fmt>(A, B, Y, a_base, a_off, b_base, b_off, out_index, column, is_sum, mask, prev, rank, rounds, [conv…], [int…]) -> Z``
    Applies faults inside the products and partial sums of a matrix product or convolution
    exactly, in ``O(faults x K)``: for each fault it gathers the ``K`` operand pairs of the faulted
    output element, recomputes its products and running partial sums, flips the chosen bits of the
    chosen intermediate value and adds the resulting change to the output element. Faults that hit
    the same output element are applied in execution order (``rank``, via ``Loop``) so a later
    partial-sum fault flips the already-faulty value.
    Operand gather: ``A_flat[a_base + a_off]`` and ``B_flat[b_base + b_off]`` (``[F, K]``); for
    convolutions, positions outside the input (padding) read as 0.
    ``column`` indexes ``[p_0..p_{K-1}, s_0..s_{K-1}, s_K]`` where ``s_K`` is the bias add.
    fmt: ``fp32``, ``fp16`` (products rounded to binary16 and flipped as 16-bit values, partial sums
    in binary32), ``int`` (QDQ integer arithmetic; flips in ``w``-bit two's complement).

``GemmFaultsBT_<fmt>``: ``GemmFaults_<fmt>`` with B given transposed (``[N, K]``).

``ConvGatherFaults_<fmt>(A, B, Y, faults, a_index, b_index, bias, [int…]) -> Z``
    ``ConvFaults_<fmt>`` for any convolution (1-D, 3-D, ConvTranspose): the sampler gives the K
    flat operand indices of each fault's output element whole (``a_index``, ``b_index`` [F, K];
    ``a_index`` -1 for a zero operand: padding, or a missing tap of a transposed convolution).

Each operator also exists as ``<name>NoLog_<suffix>`` (e.g. ``GemmFaultsNoLog_fp32``): the same
``Z`` without the ``log`` output, so that graphs built without fault logging do no log work.
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper

FAULT_DOMAIN = "ai.onnxft"
FAULT_DOMAIN_VERSION = 1
OPSET = 26

_FLOAT_BITS = {TensorProto.FLOAT: TensorProto.INT32, TensorProto.FLOAT16: TensorProto.INT16}
FLIP_DTYPES = {
    "float32": TensorProto.FLOAT,
    "float16": TensorProto.FLOAT16,
    "int8": TensorProto.INT8,
    "uint8": TensorProto.UINT8,
}
GEMM_FORMATS = ("fp32", "fp16", "int")


class _Body:
    """Collects the nodes of one function body; ``op`` returns the output name."""

    def __init__(self, prefix: str):
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0
        self._prefix = prefix

    def op(self, op_type: str, *inputs: str, n_out: int = 1, **attrs):
        outs = []
        for _ in range(n_out):
            self._n += 1
            outs.append(f"{self._prefix}_{self._n}")
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if n_out == 1 else outs

    def const_ints(self, values: list[int]) -> str:
        return self.op("Constant", value_ints=list(values))

    def const_int(self, value: int) -> str:
        return self.op("Constant", value_int=int(value))

    def const_float(self, value: float) -> str:
        return self.op("Constant", value_float=float(value))


def _log(b: _Body, value: str, flipped: str, name: str = "log") -> None:
    """Second output ``log``: [F, 2] float64 of (value before the flip, value after it)."""
    cols = [b.op("Unsqueeze", b.op("Cast", v, to=TensorProto.DOUBLE), b.const_ints([1])) for v in (value, flipped)]
    b.nodes.append(helper.make_node("Concat", cols, [name], axis=1))


def _axis0_after(b: _Body, shape: str) -> str:
    """The constant axes ``[0]``, computed from ``shape`` so that the scatter that uses it runs after
    ``Shape(Y)``: onnxruntime may then update Y's buffer in place instead of copying it. Computed
    inside the faulty branch, so that it costs nothing at fault-free sites (the If that reads it
    then runs after ``Shape(Y)``, and the scatter after the If)."""
    return b.op("Concat", b.op("Slice", shape, b.const_ints([0]), b.const_ints([0])), b.const_ints([0]), axis=0)


def _gated(outer: _Body, work: _Body, outputs: list[tuple[str, int]], log: bool = True) -> list[str]:
    """Run ``work`` only when ``faults`` has rows: ``If(Size(faults) > 0)``. A fault-free site then
    costs three tiny nodes. ``outputs`` are [1, F] rows (empty [1, 0] without faults), ready for the
    scatter. Returns the names of ``outputs`` (and the function output ``log``)."""
    work_outs = [helper.make_tensor_value_info(n, t, None) for n, t in outputs]
    logs = [("work_log", TensorProto.DOUBLE)] if log else []
    if log:
        work_outs.append(helper.make_tensor_value_info("work_log", TensorProto.DOUBLE, ["F", 2]))
    idle_nodes, idle_outs = [], []
    for n, t in outputs + logs:
        shape = [0, 2] if n == "work_log" else [1, 0]
        idle_nodes.append(helper.make_node("Constant", [], [f"idle_{n}"], value=helper.make_tensor(f"e_{n}", t, shape, [])))
        idle_outs.append(helper.make_tensor_value_info(f"idle_{n}", t, None))
    has = outer.op("Greater", outer.op("Size", "faults"),
                   outer.op("Constant", value=helper.make_tensor("z", TensorProto.INT64, [], [0])))
    names = [f"{outer._prefix}_{n}" for n, _ in outputs]
    outer.nodes.append(helper.make_node(
        "If", [has], names + (["log"] if log else []), then_branch=helper.make_graph(work.nodes, "faulty", [], work_outs),
        else_branch=helper.make_graph(idle_nodes, "fault_free", [], idle_outs)))
    return names


def op_name(base: str, suffix: str, log: bool = True) -> str:
    """``FlipBits_float32``, or ``FlipBitsNoLog_float32`` for the variant without the ``log``
    output (injection graphs built without fault logging use those: no log work per fault)."""
    return f"{base}{'' if log else 'NoLog'}_{suffix}"


def flip_bits_function(dtype: str, log: bool = True) -> onnx.FunctionProto:
    elem = FLIP_DTYPES[dtype]
    mask_type = {"float32": TensorProto.INT32, "float16": TensorProto.INT16, "int8": TensorProto.INT8,
                 "uint8": TensorProto.UINT8}[dtype]
    t = _Body("fb")
    shape = t.op("Shape", "Y")
    # Flatten aliases Y's buffer and ScatterElements then updates it in place: a site without
    # faults costs a few tiny nodes, never a copy of Y (Reshape would copy).
    flat = t.op("Flatten", "Y", axis=0)  # [1, N]
    w = _Body("fw")
    _unpack(w, ELEMENTWISE_COLUMNS, {"mask": mask_type}, keep=("index",))
    w.nodes.append(helper.make_node("Unsqueeze", [w.op("Squeeze", "index", w.const_ints([1])), _axis0_after(w, shape)],
                                    ["work_index"]))  # [1, F]
    vals = w.op("GatherElements", flat, "work_index", axis=1)
    if elem in _FLOAT_BITS:
        bits = w.op("BitCast", vals, to=_FLOAT_BITS[elem])
        w.nodes.append(helper.make_node("BitCast", [w.op("BitwiseXor", bits, "mask")], ["work_flipped"], to=elem))
    else:
        w.nodes.append(helper.make_node("BitwiseXor", [vals, "mask"], ["work_flipped"]))
    if log:
        squeeze = w.const_ints([0])
        _log(w, w.op("Squeeze", vals, squeeze), w.op("Squeeze", "work_flipped", squeeze), name="work_log")
    flipped, index = _gated(t, w, [("work_flipped", elem), ("work_index", TensorProto.INT64)], log)
    scattered = t.op("ScatterElements", flat, index, flipped, axis=1)
    t.nodes.append(helper.make_node("Reshape", [scattered, shape], ["Z"]))
    return helper.make_function(
        FAULT_DOMAIN, op_name("FlipBits", dtype, log), ["Y", "faults"], ["Z", "log"] if log else ["Z"], t.nodes,
        [helper.make_opsetid("", OPSET)],
        doc_string="Flip the bits of faults[f, 1] in element faults[f, 0] of the flattened Y.",
    )


# Columns of the int64 fault tables (one row per faulted operation); the sampler writes them.
ELEMENTWISE_COLUMNS = ("index", "mask")
FAULT_COLUMNS = ("out_index", "column", "is_sum", "mask", "prev", "rank", "channel")
GEMM_COLUMNS = ("a_row", "b_col") + FAULT_COLUMNS
CONV_COLUMNS = ("a_base", "b_base") + FAULT_COLUMNS + ("ih0", "iw0")
# Convolutions other than plain 2-D Conv (1-D, 3-D, ConvTranspose): the operand indices of each
# fault's K input values come whole from the sampler (input ``a_index`` [F, K], -1 = a zero operand).
GATHER_COLUMNS = FAULT_COLUMNS
INT_COLUMNS = ("width_mask",)
# Column vectors [F] vs. column matrices [F, 1] (these broadcast against [K] offsets).
_MATRIX_COLUMNS = ("a_base", "b_base", "ih0", "iw0")

GEMM_INPUTS = ["A", "B", "Y", "faults"]
CONV_INPUTS = ["A", "B", "Y", "faults", "a_off", "b_off", "dh", "dw", "bias"]
GATHER_INPUTS = ["A", "B", "Y", "faults", "a_index", "b_index", "bias"]
INT_INPUTS = ["za", "zb", "sa", "sb"]


def table_columns(conv: bool, is_int: bool, gathered: bool = False) -> tuple[str, ...]:
    base = GATHER_COLUMNS if gathered else CONV_COLUMNS if conv else GEMM_COLUMNS
    return base + (INT_COLUMNS if is_int else ())


def _unpack(b: "_Body", columns, types: dict | None = None, keep=_MATRIX_COLUMNS) -> None:
    """Name each column of ``faults`` after itself (the rest of the body reads those names): one
    ``Split`` into [F, 1] columns; those in ``keep`` stay [F, 1], the others become [F] vectors."""
    types = types or {}
    parts = [name if name in keep else f"{name}_col" for name in columns]
    b.nodes.append(helper.make_node("Split", ["faults"], parts, axis=1, num_outputs=len(columns)))
    squeeze = b.const_ints([1])
    for name, part in zip(columns, parts):
        if name in keep:
            continue
        to = types.get(name)
        if to is None:
            b.nodes.append(helper.make_node("Squeeze", [part, squeeze], [name]))
        else:
            b.nodes.append(helper.make_node("Cast", [b.op("Squeeze", part, squeeze)], [name], to=to))


def _pick(b: _Body, cond: str, if_true: str, if_false: str) -> str:
    """``Where(cond, if_true, if_false)`` for [F] vectors that keeps every bit: onnxruntime's
    Where turns a selected -0 of its second input into +0, which then flips differently."""
    one = b.const_ints([1])
    both = b.op("Concat", b.op("Unsqueeze", if_true, one), b.op("Unsqueeze", if_false, one), axis=1)  # [F, 2]
    column = b.op("Unsqueeze", b.op("Cast", b.op("Not", cond), to=TensorProto.INT64), one)
    return b.op("Squeeze", b.op("GatherElements", both, column, axis=1), one)


def _flip_float32(b: _Body, v: str, mask: str) -> str:
    return b.op("BitCast", b.op("BitwiseXor", b.op("BitCast", v, to=TensorProto.INT32), mask),
                to=TensorProto.FLOAT)


def _per_channel(b: _Body, vec: str, minus1: str) -> str:
    """``vec[channel mod size(vec)]``: per-tensor (size 1) and per-channel vectors alike."""
    flat = b.op("Reshape", vec, minus1)
    return b.op("Gather", flat, b.op("Mod", "channel", b.op("Size", flat)))


def _flipped(b: _Body, value: str, fmt: str) -> str:
    """``value`` with the bits of ``mask`` flipped (reads ``mask``, ``is_sum``, ``width_mask``)."""
    if fmt == "int":
        # w-bit two's complement: x = v mod 2^w; signed(x') - signed(x) is the change.
        x = b.op("BitwiseAnd", value, "width_mask")
        x_new = b.op("BitwiseXor", x, "mask")
        full = b.op("Add", "width_mask", b.op("Constant", value=helper.make_tensor("one", TensorProto.INT64, [], [1])))
        half = b.op("Div", full, b.op("Constant", value=helper.make_tensor("two", TensorProto.INT64, [], [2])))
        zero = b.op("Sub", x, x)
        sx = b.op("Sub", x, b.op("Where", b.op("GreaterOrEqual", x, half), full, zero))
        sxn = b.op("Sub", x_new, b.op("Where", b.op("GreaterOrEqual", x_new, half), full, zero))
        return b.op("Add", value, b.op("Sub", sxn, sx))
    if fmt == "fp16":  # products are binary16 values (16-bit masks), partial sums binary32
        flip32 = _flip_float32(b, value, "mask")
        v16 = b.op("Cast", value, to=TensorProto.FLOAT16)
        m16 = b.op("Cast", "mask", to=TensorProto.INT16)
        flip16 = b.op("Cast", b.op("BitCast", b.op("BitwiseXor", b.op("BitCast", v16, to=TensorProto.INT16), m16),
                                   to=TensorProto.FLOAT16), to=TensorProto.FLOAT)
        return _pick(b, "is_sum", flip32, flip16)
    return _flip_float32(b, value, "mask")


def _change(b: _Body, value: str, fmt: str) -> str:
    """Change of ``value`` when the bits of ``mask`` flip."""
    return b.op("Sub", _flipped(b, value, fmt), value)


def _gemm_clean(b: _Body, fmt: str, batched: bool, minus1: str, b_transposed: bool) -> tuple[str, int]:
    """Clean value [F] of each faulted operation of a matrix product (column c < K: product p_c;
    K <= c < 2K: partial sum s_{c-K}) and its accumulator type. A product fault reads one element
    of each operand; only partial-sum faults gather their K operand pairs and run the sums."""
    is_int = fmt == "int"
    a_mat = b.op("Flatten", "A", axis=-1)  # [rows, K]; Flatten aliases (Reshape could copy)
    if batched:  # B [..., K, N]: its columns are the rows of B^T
        perm = helper.make_attribute_ref("perm", onnx.AttributeProto.INTS)
        transpose = helper.make_node("Transpose", ["B"], ["gf_bt"])
        transpose.attribute.append(perm)
        b.nodes.append(transpose)
        b_mat = b.op("Flatten", "gf_bt", axis=-1)
    elif b_transposed:  # B^T [N, K] (a constant transpose that onnxruntime folds at load time)
        b_mat = "B"
    else:  # B [K, N]
        b_mat = None
    k = b.op("Gather", b.op("Shape", a_mat), b.const_int(1))
    # Products: element j of the operand row and column (j = column, clamped for the sum faults,
    # whose values are replaced below).
    j = b.op("Min", "column", b.op("Sub", k, b.const_int(1)))  # [F, 1]
    a_el = b.op("GatherND", a_mat, b.op("Concat", "a_row", j, axis=1))  # [F]
    if b_mat is None:
        b_el = b.op("GatherND", "B", b.op("Concat", j, "b_col", axis=1))
    else:
        b_el = b.op("GatherND", b_mat, b.op("Concat", "b_col", j, axis=1))
    # Partial sums: the K operand pairs of each sum fault's element, multiplied and summed in order.
    sum_rows = b.op("Squeeze", b.op("NonZero", "is_sum"), b.const_ints([0]))  # [S]
    squeeze1 = b.const_ints([1])
    a_vals = b.op("Gather", a_mat, b.op("Squeeze", b.op("Gather", "a_row", sum_rows, axis=0), squeeze1), axis=0)
    b_rows = b.op("Squeeze", b.op("Gather", "b_col", sum_rows, axis=0), squeeze1)  # [S]
    if b_mat is None:  # gather the S columns, then transpose the small [K, S] result
        b_vals = b.op("Transpose", b.op("Gather", "B", b_rows, axis=1), perm=[1, 0])
    else:
        b_vals = b.op("Gather", b_mat, b_rows, axis=0)  # [S, K]
    if is_int:
        za = b.op("Cast", "za", to=TensorProto.INT64)
        zb = b.op("Cast", _per_channel(b, "zb", minus1), to=TensorProto.INT64)  # [F]
        p_val = b.op("Mul", b.op("Sub", b.op("Cast", a_el, to=TensorProto.INT64), za),
                     b.op("Sub", b.op("Cast", b_el, to=TensorProto.INT64), zb))
        zb_s = b.op("Unsqueeze", b.op("Gather", zb, sum_rows), squeeze1)  # [S, 1]
        prods = b.op("Mul", b.op("Sub", b.op("Cast", a_vals, to=TensorProto.INT64), za),
                     b.op("Sub", b.op("Cast", b_vals, to=TensorProto.INT64), zb_s))
        acc_type = TensorProto.INT64
    else:
        def f32(v):  # (a same-type Cast would copy)
            return v if fmt == "fp32" else b.op("Cast", v, to=TensorProto.FLOAT)
        p_val = b.op("Mul", f32(a_el), f32(b_el))
        prods = b.op("Mul", f32(a_vals), f32(b_vals))
        if fmt == "fp16":  # fp16 multiplier: the exact fp32 product rounded once to binary16
            p_val = b.op("Cast", b.op("Cast", p_val, to=TensorProto.FLOAT16), to=TensorProto.FLOAT)
            prods = b.op("Cast", b.op("Cast", prods, to=TensorProto.FLOAT16), to=TensorProto.FLOAT)
        acc_type = TensorProto.FLOAT
    # Running sums in the [K, S] layout: CumSum along axis 0 adds whole contiguous rows (vectorised
    # over faults, ~2x faster than along axis 1 of [S, K] even with the Transpose); each fault's
    # sums are still accumulated one product at a time, in order.
    sums_t = b.op("CumSum", b.op("Transpose", prods, perm=[1, 0]), b.const_int(0))  # [K, S]
    step = b.op("Reshape", b.op("Sub", b.op("Gather", "column", sum_rows, axis=0), k), b.const_ints([1, -1]))
    s_val = b.op("Reshape", b.op("GatherElements", sums_t, step, axis=0), minus1)  # [S]
    # Scatter writes the sums' values exactly (onnxruntime's Where can turn a -0 into +0).
    return b.op("ScatterElements", p_val, sum_rows, s_val, axis=0), acc_type


def gemm_faults_function(fmt: str, conv: bool = False, batched: bool = False,
                         b_transposed: bool = False, log: bool = True, gathered: bool = False) -> onnx.FunctionProto:
    """Build ``GemmFaults_<fmt>`` (B a matrix), ``GemmFaultsBT_<fmt>`` (``b_transposed``: the
    second input is B^T [N, K], so a fault's operand column is one contiguous row),
    ``BatchedGemmFaults_<fmt>`` (B with batch axes), ``ConvFaults_<fmt>`` (``conv=True``) or
    ``ConvGatherFaults_<fmt>`` (``gathered=True``: any convolution, the K operand indices of each
    fault given whole as ``a_index`` and ``b_index`` [F, K]; ``a_index`` -1 for a zero operand)."""
    if fmt not in GEMM_FORMATS:
        raise ValueError(f"unknown gemm format {fmt!r}")
    conv = conv or gathered
    b = _Body("gf")
    is_int = fmt == "int"
    minus1 = b.const_ints([-1])
    _unpack(b, table_columns(conv, is_int, gathered),
            {"is_sum": TensorProto.BOOL, "mask": None if is_int else TensorProto.INT32},
            # [F, 1] columns need no Squeeze; prev/rank are squeezed only where chains are applied
            keep=_MATRIX_COLUMNS + ("column", "prev", "rank") + (() if conv else ("a_row", "b_col"))
            + (("channel",) if not (conv or is_int) else ()))
    # rounds = 1 + the largest rank (faults of one element are applied in rank order)
    b.nodes.append(helper.make_node("Add", [b.op("ReduceMax", "rank", keepdims=0), b.const_int(1)], ["rounds"]))
    if not conv:
        clean, acc_type = _gemm_clean(b, fmt, batched, minus1, b_transposed)
    else:
        # Flatten aliases the operands (Reshape of a tensor used elsewhere would copy it).
        a_flat = b.op("Flatten", "A", axis=0)  # [1, size]
        b_flat = b.op("Flatten", "B", axis=0)
        b_idx = "b_index" if gathered else b.op("Add", "b_base", "b_off")
        zero = b.const_int(0)
        if gathered:  # -1 marks a zero operand (padding, or a tap between a transposed conv's strides)
            valid = b.op("GreaterOrEqual", "a_index", zero)
            a_idx = b.op("Where", valid, "a_index", zero)
        else:
            a_idx = b.op("Add", "a_base", "a_off")  # [F, K]
            # Input positions outside the image are padding: read them as 0 (a real 0*w product).
            x_shape = b.op("Shape", "A")
            height = b.op("Gather", x_shape, b.const_int(2))
            width = b.op("Gather", x_shape, b.const_int(3))
            ih = b.op("Add", "ih0", "dh")
            iw = b.op("Add", "iw0", "dw")
            valid = b.op("And",
                         b.op("And", b.op("GreaterOrEqual", ih, zero), b.op("Less", ih, height)),
                         b.op("And", b.op("GreaterOrEqual", iw, zero), b.op("Less", iw, width)))
            a_idx = b.op("Where", valid, a_idx, zero)
        a_vals = b.op("Squeeze", b.op("Gather", a_flat, a_idx, axis=1), b.const_ints([0]))  # [F, K]
        b_vals = b.op("Squeeze", b.op("Gather", b_flat, b_idx, axis=1), b.const_ints([0]))
        if is_int:
            a_int = b.op("Sub", b.op("Cast", a_vals, to=TensorProto.INT64),
                         b.op("Cast", "za", to=TensorProto.INT64))
            zb_f = b.op("Unsqueeze", _per_channel(b, "zb", minus1), b.const_ints([1]))
            b_int = b.op("Sub", b.op("Cast", b_vals, to=TensorProto.INT64),
                         b.op("Cast", zb_f, to=TensorProto.INT64))
            a_int = b.op("Where", valid, a_int, b.op("Constant", value=helper.make_tensor("z", TensorProto.INT64, [], [0])))
            prods = b.op("Mul", a_int, b_int)
            acc_type = TensorProto.INT64
        else:
            a32 = b.op("Cast", a_vals, to=TensorProto.FLOAT)
            a32 = b.op("Where", valid, a32, b.const_float(0.0))
            prods = b.op("Mul", a32, b.op("Cast", b_vals, to=TensorProto.FLOAT))
            if fmt == "fp16":  # fp16 multiplier: the exact fp32 product rounded once to binary16
                prods = b.op("Cast", b.op("Cast", prods, to=TensorProto.FLOAT16), to=TensorProto.FLOAT)
            acc_type = TensorProto.FLOAT
        # Running sums in the [K, F] layout: CumSum along axis 0 adds whole contiguous rows (vectorised
        # over faults), about 2x faster than CumSum along axis 1 of [F, K] even with the Transpose, and
        # each fault's sums are still accumulated one product at a time, in order.
        sums_t = b.op("CumSum", b.op("Transpose", prods, perm=[1, 0]), b.const_int(0))  # [K, F]
        col_vec = b.const_ints([-1, 1])
        last = b.op("Reshape", b.op("Slice", sums_t, b.const_ints([-1]), b.const_ints([2**62]), b.const_ints([0])),
                    col_vec)  # [F, 1]
        bias = _per_channel(b, "bias", minus1)
        bias = b.op("Unsqueeze", b.op("Cast", bias, to=acc_type), b.const_ints([1]))
        with_bias = b.op("Add", last, bias)
        # Convolutions (one or two sites per network) gather the K operand pairs of every fault.
        # The clean value of each faulted operation: column c < K is product p_c, K <= c < 2K the
        # partial sum s_{c-K}, c == 2K the bias add (picked without concatenating [F, 2K+1] tables).
        col = "column"  # [F, 1]
        k = b.op("Gather", b.op("Shape", prods), b.const_int(1))
        k_minus1 = b.op("Sub", k, b.const_int(1))
        zero = b.op("Sub", k, k)
        p_val = b.op("GatherElements", prods, b.op("Min", col, k_minus1), axis=1)
        s_step = b.op("Min", b.op("Max", b.op("Sub", col, k), zero), k_minus1)  # [F, 1]
        s_val = b.op("Reshape", b.op("GatherElements", sums_t, b.op("Reshape", s_step, b.const_ints([1, -1])), axis=0),
                     col_vec)
        # Select by gathering from [F, 2 or 3] (onnxruntime's Where can turn a -0 into +0).
        pick = b.op("Cast", b.op("GreaterOrEqual", col, k), to=TensorProto.INT64)
        pick = b.op("Add", pick, b.op("Cast", b.op("Equal", col, b.op("Add", k, k)), to=TensorProto.INT64))
        choices = [p_val, s_val, with_bias]
        clean = b.op("Squeeze", b.op("GatherElements", b.op("Concat", *choices, axis=1), pick, axis=1),
                     b.const_ints([1]))  # [F]

    # Faults of one output element must be applied in execution order. Chains are rare, so the
    # loop over ranks runs only when some element has several faults (rounds > 1).
    chained = _Body("ch")
    # The zero slot (``before`` of an element's first fault) is -0 for floats: x + (-0) is x for
    # every x, -0 included, so a first fault sees its clean value exactly as without chains.
    zero_slot = chained.op("Constant", value=helper.make_tensor(
        "zs", acc_type, [1], [-0.0 if acc_type == TensorProto.FLOAT else 0]))
    cum0 = chained.op("Concat", chained.op("Sub", clean, clean), zero_slot, axis=0)  # [F+1] zeros
    lb = _Body("lb")
    before = lb.op("Gather", "cum_in", "prev_v")
    # A product's value is its own (adding a zero ``before`` would turn a -0 product into +0); after
    # a partial-sum fault the element's total change is (flipped - clean), computed directly so that
    # it neither overflows (sign flip of a huge sum) nor cancels (a huge sum flipped back to small).
    value = _pick(lb, "is_sum", lb.op("Add", clean, before), clean)
    flipped = _flipped(lb, value, fmt)
    through = _pick(lb, "is_sum", lb.op("Sub", flipped, clean), lb.op("Add", before, lb.op("Sub", flipped, value)))
    through_ext = lb.op("Concat", through, lb.op("Slice", "cum_in", lb.const_ints([-1]), lb.const_ints([2**62])), axis=0)
    this_rank = lb.op("Equal", "rank_ext", "iter")
    cum_out = _pick(lb, this_rank, through_ext, "cum_in")
    body_nodes = lb.nodes + [
        helper.make_node("Identity", [cum_out], ["cum_out"]),
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
    ]
    body = helper.make_graph(
        body_nodes, "rank_step",
        [helper.make_tensor_value_info("iter", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("cum_in", acc_type, ["F1"])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("cum_out", acc_type, ["F1"])],
    )
    # rank of the zero slot is -1 so it never changes.
    for name in ("prev", "rank"):
        chained.nodes.append(helper.make_node("Squeeze", [name, chained.const_ints([1])], [f"{name}_v"]))
    rank_ext = chained.op("Concat", "rank_v", chained.const_ints([-1]), axis=0)
    chained.nodes.append(helper.make_node("Identity", [rank_ext], ["rank_ext"]))
    cum = chained.op("Loop", "rounds", "", cum0, body=body)
    before = chained.op("Gather", cum, "prev_v")
    # The last fault of each element (no other fault names it as prev) carries the element's
    # total change; the others add nothing (telescoping differences could overflow or cancel).
    n_next = chained.op("ScatterElements",
                        chained.op("ConstantOfShape", chained.op("Shape", cum),
                                   value=helper.make_tensor("z64", TensorProto.INT64, [1], [0])),
                        "prev_v", chained.op("ConstantOfShape", chained.op("Shape", "prev_v"),
                                           value=helper.make_tensor("o64", TensorProto.INT64, [1], [1])),
                        reduction="add")
    is_last = chained.op("Equal", chained.op("Slice", n_next, chained.const_ints([0]), chained.const_ints([-1])),
                         chained.op("Constant", value=helper.make_tensor("z0", TensorProto.INT64, [], [0])))
    chained.nodes.append(helper.make_node(
        "Where", [is_last, chained.op("Slice", cum, chained.const_ints([0]), chained.const_ints([-1])),
                  chained.op("Constant", value=helper.make_tensor("zc", acc_type, [], [0]))], ["ch_change"]))
    chained.nodes.append(helper.make_node(
        "Identity", [_pick(chained, "is_sum", chained.op("Add", clean, before), clean)], ["ch_value"]))
    single = _Body("sg")
    single.nodes.append(helper.make_node("Identity", [clean], ["sg_value"]))
    single.nodes.append(helper.make_node("Identity", [_change(single, clean, fmt)], ["sg_change"]))

    def branch(body_: _Body, name: str, prefix: str):
        return helper.make_graph(body_.nodes, name, [], [
            helper.make_tensor_value_info(f"{prefix}_value", acc_type, ["F"]),
            helper.make_tensor_value_info(f"{prefix}_change", acc_type, ["F"])])

    is_chained = b.op("Greater", "rounds", b.op("Constant", value=helper.make_tensor("one", TensorProto.INT64, [], [1])))
    value, change = b.op("If", is_chained, n_out=2, then_branch=branch(chained, "chained", "ch"),
                         else_branch=branch(single, "single", "sg"))
    if log:
        _log(b, value, _flipped(b, value, fmt), name="work_log")
    if is_int:
        scale = b.op("Mul", b.op("Reshape", "sa", minus1),
                     _per_channel(b, "sb", minus1))
        change = b.op("Mul", b.op("Cast", change, to=TensorProto.FLOAT), scale)
    if acc_type != TensorProto.FLOAT:
        change = b.op("Cast", change, to=TensorProto.FLOAT)
    t = _Body("gt")
    y_shape = t.op("Shape", "Y")
    axes = _axis0_after(b, y_shape)
    b.nodes.append(helper.make_node("Unsqueeze", [change, axes], ["work_change"]))  # [1, F]
    b.nodes.append(helper.make_node("Unsqueeze", ["out_index", axes], ["work_index"]))
    update, index = _gated(t, b, [("work_change", TensorProto.FLOAT), ("work_index", TensorProto.INT64)], log)
    y_flat = t.op("Flatten", "Y", axis=0)  # aliases Y
    if fmt == "fp16":  # onnxruntime's CPU ScatterElements has no float16 'add': add in fp32, cast back
        y32 = t.op("ScatterElements", t.op("Cast", y_flat, to=TensorProto.FLOAT), index, update, axis=1,
                   reduction="add")
        updated = t.op("CastLike", y32, y_flat)
    else:
        updated = t.op("ScatterElements", y_flat, index, update, axis=1, reduction="add")
    t.nodes.append(helper.make_node("Reshape", [updated, y_shape], ["Z"]))
    b = t

    inputs = list(GATHER_INPUTS if gathered else CONV_INPUTS if conv else GEMM_INPUTS) + (INT_INPUTS if is_int else [])
    base = "ConvGather" if gathered else "Conv" if conv else "BatchedGemm" if batched else "Gemm"
    name = op_name(base + ("FaultsBT" if b_transposed else "Faults"), fmt, log)
    return helper.make_function(
        FAULT_DOMAIN, name, inputs, ["Z", "log"] if log else ["Z"], b.nodes, [helper.make_opsetid("", OPSET)],
        attributes=["perm"] if batched else [],
        doc_string=f"Exact product/partial-sum faults of a {'convolution' if conv else 'matrix product'} ({fmt})."
        + (" perm: B's axes with the last two swapped." if batched else ""),
    )


def all_functions() -> dict[str, onnx.FunctionProto]:
    fns = []
    for log in (True, False):
        fns += [flip_bits_function(d, log=log) for d in FLIP_DTYPES]
        fns += [gemm_faults_function(f, conv=True, log=log) for f in GEMM_FORMATS]
        fns += [gemm_faults_function(f, gathered=True, log=log) for f in GEMM_FORMATS]
        fns += [gemm_faults_function(f, batched=batched, log=log) for f in GEMM_FORMATS for batched in (False, True)]
        fns += [gemm_faults_function(f, b_transposed=True, log=log) for f in GEMM_FORMATS]
    return {f.name: f for f in fns}
