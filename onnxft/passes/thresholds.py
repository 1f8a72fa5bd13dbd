"""ABFT detection thresholds: a rounding bound that holds for any summation order and FMA on both
sides of the checksum test, for the arithmetic the serving runtime uses.

The test of one row (or block, or conv output position) is

    |fl(r - ref)| <= scale,   r = sum of the n_sum computed outputs,   ref = A @ (B e),
    scale = tau * |A| @ (|B| e)

and ``tau_bound`` returns the smallest ``tau`` this module can prove never fails on fault-free
data (no overflow or underflow). Every error is counted in **roundings of u = 2^-24** (float32's
unit roundoff, the arithmetic of the checks): a rounding with a coarser unit ``u'`` counts as
``u'/u`` of them, since ``(1 + u)^(u'/u) >= 1 + u'``. With ``gamma_m = m u / (1 - m u)`` and
Higham's ``(1 + gamma_j)(1 + gamma_k) <= 1 + gamma_{j+k}``:

    t_Y   = 2 r_in + K r_acc + r_out + e r_elt   one output: inputs rounded (TF32 ...), K-term dot
                                                 product in any order / FMA, output rounding, e
                                                 elementwise ops inside the unit (bias add, scaling)
    a     = n_sum - 1 + t_Y                      the computed row sum r against the exact one
    t_c   = 1   (B e offline: float64, rounded once)   or   n_sum - 1 + r_in   (B e at run time)
    b     = 2 r_in + K + t_c + 2                 ref = A @ (B e) (+ sum bias): its own K-term dot
                                                 product, the checksum's error, the bias-sum add
    c     = 2 r_in + K + t_c + 5                 the computed scale's shortfall below tau |A||B|e
                                                 (tau fold or multiply, bias add, tau arithmetic,
                                                 the add of the absolute term eta)
    tau   = (1 + u) (gamma_a + gamma_b) / (1 - gamma_c)          (1 + u: the subtraction r - ref)

Leading order (float32, constant B): ``tau ~ (2K + n_sum + e + 2) u``. docs/abft.md derives it.

Underflow is absolute, not relative: a result below the smallest normal number ``tiny`` of its
format errs by up to ``tiny`` when the runtime flushes it to zero (FTZ: GPUs, x86 with FTZ/DAZ
set; assumed for float32-range formats) and by half a subnormal ulp, ``tiny u``, with gradual
underflow (assumed for float16, whose subnormals the hardware keeps: ``underflow_term``). No ``tau`` covers that (a row
whose every output underflows leaves a residual of its whole ``|A||B|e``), so every test is

    |fl(r - ref)| <= tau |A| @ (|B| e) + eta,      eta = underflow_term(K, n_sum, ...)

``eta`` counts every rounding of one test that can land below ``tiny`` (``underflow_term``).

float16 units (float16 tensors, checked in float32) have two arithmetics. ``fp16`` is the worst
case, float16 accumulation (``K u_acc = K 2^-11``: 0.19 at K = 384, no finite bound from K = 2048):
what MLAS's ARM64 half-precision GEMM does. ``fp16acc32`` is float16 storage with float32
accumulation, what onnxruntime's x86-64 CPU provider does (it has no float16 MatMul/Gemm/Conv
kernel there and runs them in float32 between Casts) and its CUDA provider with
``ORT_CUDA_GEMM_OPTIONS=2`` (cuBLAS compute type 32F, its default, and split-K reductions kept in
float32): the product of two float16 numbers (11 significant bits each) is exact in float32, so
``r_in = 0``; the K-term sum rounds in float32 (``2K``: truncating tensor-core accumulators err
by up to 2^-23); the result is stored in float16 (``r_out = 2^-11 / u = 2^13``); a bias add in
float16 (``r_elt = 2^13``). Leading order ``tau ~ (3K + n_sum + 2^13 (1 + e)) u``: 1.56e-3 at
K = n_sum = 384 with a bias (e = 2), against 0.24 with float16 accumulation. ``unit_precision`` says which one a float16 unit gets: ``fp16acc32`` only when asked for.
"""
from __future__ import annotations

from dataclasses import dataclass

U32 = 2.0**-24  # float32 unit roundoff: every check is computed in float32
TINY32 = 2.0**-126  # float32's smallest normal number
TINY16 = 2.0**-14  # float16's


@dataclass(frozen=True)
class Precision:
    """Arithmetic of the serving runtime's GEMMs/Convs, as unit roundoffs.

    ``u_in``: rounding of each GEMM input before the products (TF32: 10 mantissa bits);
    ``u_acc``: the accumulation; ``u_out``: rounding of the result to a narrower storage format;
    ``u_elt``: the elementwise ops of a unit (bias add, scaling). The checks themselves run in
    float32, their GEMV products with the same input rounding ``u_in``."""

    name: str
    u_in: float
    u_acc: float
    u_out: float
    u_elt: float
    note: str
    # smallest normal number of the format each rounding lands in (underflow_term): float32,
    # TF32 and bfloat16 share float32's exponent range (2^-126), float16's is 2^-14
    tiny_acc: float = 2.0**-126
    tiny_out: float = 2.0**-126
    tiny_elt: float = 2.0**-126


PRECISIONS = {
    "fp32": Precision("fp32", 0.0, U32, 0.0, U32, "IEEE float32 throughout (onnxruntime CPU, CUDA with use_tf32=0)"),
    # TF32 keeps 10 mantissa bits: rounding to nearest errs by 2^-11, but tensor cores fed float32
    # registers ignore the 13 low bits (truncation, 2^-10), and which one a kernel does is not
    # documented: the bound takes the larger
    # tensor cores' float32 accumulators truncate (Fasi et al., "Numerical behavior of NVIDIA tensor
    # cores", 2021): each accumulation errs by up to 2^-23, not 2^-24
    "tf32": Precision("tf32", 2.0**-10, 2.0**-23, 0.0, U32,
                      "float32 with GEMM/Conv inputs cut to 10 mantissa bits (rounded or truncated), float32 "
                      "accumulation (onnxruntime CUDA on Ampere and later with its default use_tf32=1)"),
    "fp16": Precision("fp16", 2.0**-11, 2.0**-11, 0.0, 2.0**-11,
                      "float16 inputs, float16 accumulation (the worst case: MLAS's ARM64 half GEMM, cuBLAS "
                      "with ORT_CUDA_GEMM_OPTIONS=1)", TINY16, TINY16, TINY16),
    # float16 storage, float32 accumulation: float16 x float16 products are exact in float32
    # (22 significant bits), so the inputs add no rounding; the result and the bias add round to
    # float16. Accumulation at 2^-23, not 2^-24: GPU tensor cores' float32 accumulators truncate
    # rather than round (CPU sums round to nearest; the cost is K u against the output's 2^13 u).
    # For a float32 unit of the same model this runtime is IEEE float32 (unit_precision)
    "fp16acc32": Precision("fp16acc32", 0.0, 2 * U32, 2.0**-11, 2.0**-11,
                           "float16 tensors, float32 accumulation and reduction (onnxruntime CPU on x86-64; CUDA "
                           "with ORT_CUDA_GEMM_OPTIONS=2 and use_tf32=0); float32 units as fp32",
                           TINY32, TINY16, TINY16),
    "bf16": Precision("bf16", 2.0**-8, 2.0**-23, 2.0**-8, 2.0**-8,
                      "bfloat16 inputs and outputs, float32 accumulation (bf16 'fast math' GEMMs, bf16 models)"),
}
DEFAULT_PRECISION = "tf32"  # safe on CPU (fp32 is finer) and on CUDA with its default options


def precision(name: str) -> Precision:
    try:
        return PRECISIONS[name]
    except KeyError:
        raise ValueError(f"unknown precision {name!r}; choose from {', '.join(PRECISIONS)}") from None


def _gamma(m: float) -> float:
    x = m * U32
    return x / (1.0 - x) if x < 1.0 else float("inf")


def rounding_counts(K: int, n_sum: int, prec: str | Precision = DEFAULT_PRECISION, extra_roundings: int = 0,
                    runtime_checksums: bool = False) -> tuple[float, float, float]:
    """``(a, b, c)``: the rounding counts of the module docstring, in units of 2^-24."""
    p = prec if isinstance(prec, Precision) else precision(prec)
    r_in, r_acc, r_out, r_elt = p.u_in / U32, p.u_acc / U32, p.u_out / U32, p.u_elt / U32
    n = max(int(n_sum), 1)
    t_y = 2 * r_in + K * r_acc + r_out + extra_roundings * r_elt
    t_c = (n - 1 + r_in) if runtime_checksums else 1
    return n - 1 + t_y, 2 * r_in + K + t_c + 2, 2 * r_in + K + t_c + 5


def tau_bound(K: int, n_sum: int, prec: str | Precision = DEFAULT_PRECISION, extra_roundings: int = 0,
              runtime_checksums: bool = False) -> float:
    """The rounding bound on ``|r - ref| / (|A| @ |B| e)`` (module docstring); no fault-free input
    (without overflow/underflow) can exceed it, in any summation order, with or without FMA.

    ``K``: terms of each dot product (Conv: Cin/group x kernel size); ``n_sum``: outputs summed by
    the test (N for a row test, the block width for LB-ABFT's block test, M for a column test,
    Cout for a Conv); ``prec``: the runtime's arithmetic (``PRECISIONS``); ``extra_roundings``:
    elementwise ops inside the unit after the products (a bias add: 1; attention's scaling: 2);
    ``runtime_checksums``: ``B e`` computed in the graph (activation B, column sums of A) rather
    than offline in float64. Returns ``inf`` when no finite bound exists (fp16 accumulation with
    K >= 2048)."""
    a, b, c = rounding_counts(K, n_sum, prec, extra_roundings, runtime_checksums)
    ga, gb, gc = _gamma(a), _gamma(b), _gamma(c)
    if not gc < 1.0 or ga == float("inf") or gb == float("inf"):
        return float("inf")
    return (1.0 + U32) * (ga + gb) / (1.0 - gc)


def unit_precision(prec: str | Precision = DEFAULT_PRECISION, fp16: bool = False) -> Precision:
    """The arithmetic a unit's bound is computed for.

    ``fp16acc32`` names a runtime (onnxruntime CPU on x86-64) whose float16 GEMMs accumulate in
    float32 and whose float32 GEMMs are IEEE float32: a float16 unit gets ``fp16acc32``, a float32
    unit ``fp32``. Any other ``prec`` gives a float32 unit ``prec``, and a float16 unit (float16
    tensors, checked in float32) every unit roundoff the larger of ``prec``'s and ``fp16``'s: float16
    accumulation is the default because float32 accumulation is not what every runtime does with
    float16 (MLAS's ARM64 half GEMM accumulates in float16; cuBLAS under onnxruntime's default
    options may reduce split-K partial sums in float16), and a coarser requested component (TF32's
    input cut, bfloat16) is kept, so the bound holds for both."""
    p = prec if isinstance(prec, Precision) else precision(prec)
    if p.name == "fp16acc32":
        return p if fp16 else PRECISIONS["fp32"]
    if not fp16 or p.name == "fp16":
        return p
    h = PRECISIONS["fp16"]
    if all(getattr(p, f) <= getattr(h, f) for f in ("u_in", "u_acc", "u_out", "u_elt")):
        return h  # (fp32: float16 is coarser in every rounding)
    return Precision(f"fp16+{p.name}", max(p.u_in, h.u_in), max(p.u_acc, h.u_acc), max(p.u_out, h.u_out),
                     max(p.u_elt, h.u_elt), f"float16 unit under {p.name}: the coarser of the two per rounding",
                     max(p.tiny_acc, h.tiny_acc), max(p.tiny_out, h.tiny_out), max(p.tiny_elt, h.tiny_elt))


def count_coefficients(prec: str | Precision = DEFAULT_PRECISION, extra_roundings: int = 0,
                       runtime_checksums: bool = False) -> tuple[tuple, tuple, tuple]:
    """``(const, per_K, per_n)``, three ``(a, b, c)`` triples with ``rounding_counts(K, n_sum) ==
    const + K per_K + n_sum per_n`` for every ``n_sum >= 1``: the counts are affine in ``K`` and
    ``n_sum``, so a graph can compute the bound from sizes known only at run time (``passes.abft``
    computes ``tau_bound``'s formula of these in float32)."""
    f = lambda K, n: rounding_counts(K, n, prec, extra_roundings, runtime_checksums)  # noqa: E731
    base, k1, n2 = f(0, 1), f(1, 1), f(0, 2)
    per_k = tuple(x - y for x, y in zip(k1, base))
    per_n = tuple(x - y for x, y in zip(n2, base))
    return tuple(x - y for x, y in zip(base, per_n)), per_k, per_n


def calibrated_tau(max_ratio: float, bound: float, prec: str | Precision = DEFAULT_PRECISION,
                   margin: float = 4.0, floor_units: float = 16.0) -> float:
    """Threshold from a measured worst residual ratio: ``margin x max_ratio``, never below
    ``floor_units`` float32 unit roundoffs, never above the bound. Calibration sessions run
    onnxruntime's CPU kernels, which show none of TF32's rounding nor a GPU's fp16/bf16 kernels',
    so for any precision but fp32 the result is the bound: calibrating tightens float32 only (a
    float32 unit under ``fp16acc32`` is fp32: ``unit_precision``)."""
    p = unit_precision(prec)
    if p.name != "fp32":
        return bound
    return min(max(margin * max_ratio, floor_units * U32), bound)


def _underflow_roundings(K: float, n_sum: float, p: Precision, extra_roundings: int, ftz: bool,
                         ftz16: bool = False) -> float:
    """The sum, over every rounding of one test that can underflow, of its largest absolute error
    (``underflow_term``'s bracket). A rounding into a flushed format errs by up to ``tiny``; one
    with gradual underflow by ``tiny u`` for products and conversions, and a sum that lands in the
    subnormal range is exact. ``ftz``: float32-range formats are flushed (the passes' model);
    ``ftz16``: float16 is flushed too (off in the passes: float16 keeps its subnormals on the
    hardware onnxruntime runs on, see ``underflow_term``)."""
    def per(u: float, tiny: float, is_sum: bool) -> float:
        if u == 0:
            return 0.0
        if (ftz16 if tiny >= TINY16 else ftz):
            return tiny
        return 0.0 if is_sum else tiny * u

    acc_p, acc_s = per(p.u_acc, p.tiny_acc, False), per(p.u_acc, p.tiny_acc, True)
    out, elt = per(p.u_out, p.tiny_out, False), per(p.u_elt, p.tiny_elt, False)
    f32_p, f32_s = per(U32, TINY32, False), per(U32, TINY32, True)
    main = n_sum * (K * (acc_p + acc_s) + out + extra_roundings * elt) + (n_sum - 1) * f32_s
    checksum = (K + 1) * (f32_p + f32_s)  # ref = A (B e): K products, K - 1 sums, the bias sum and its add
    scale = (K + 2) * (f32_p + f32_s)  # |A| (tau |B| e) flushed low: K products, K - 1 sums, bias add, tau, eta's add
    return main + checksum + scale


def underflow_term(K: int, n_sum: int, prec: str | Precision = DEFAULT_PRECISION, extra_roundings: int = 0,
                   runtime_checksums: bool = False, ftz: bool = True, ftz16: bool = False) -> float:
    """The absolute term ``eta`` of a test (module docstring): no fault-free input makes
    ``|fl(r - ref)|`` exceed ``tau_bound(...) |A| @ |B| e + eta``, underflow included.

    Counted, for ``n = n_sum`` outputs of ``K``-term dot products (the arguments of ``tau_bound``),
    each rounding's largest absolute error in its own format (``tiny`` = the smallest normal
    number, ``Precision.tiny_*``: float16 2^-14, float32/TF32/bfloat16 2^-126):

        main side    n (2K tiny_acc + tiny_out + e tiny_elt)   K products and K - 1 sums per output
                                                                (FMA only removes roundings), the
                                                                output's storage rounding (when the
                                                                precision has one), e elementwise ops
                     + (n - 1) tiny_32                          the float32 row sum
        checksum     (2K + 2) tiny_32                           ref = A (B e): K products, K - 1 sums,
                                                                the bias-sum constant and its add
        scale        (2K + 4) tiny_32                           |A| (tau |B| e) flushed low: K products,
                                                                K - 1 sums, bias add, tau, eta's add

    with FTZ (``ftz=True``, what the passes use for float32, TF32 and bfloat16: results below
    ``tiny`` flushed to zero, error up to ``tiny``; GPUs and x86 with FTZ/DAZ set do it, and the
    term is 4e-31 at K = N = 4096); with gradual underflow (``ftz=False``) a result rounded
    into the subnormal range errs by at most ``tiny u`` (half its ulp; a truncating accumulator's
    ``u`` is already its full ulp) and sums are exact there, so only products and conversions count.
    float16 is counted with gradual underflow unless ``ftz16``: the hardware onnxruntime runs
    float16 on keeps its subnormals (x86 F16C conversions ignore MXCSR.FTZ/DAZ, ARM's FPCR.FZ16 is
    off by default on Linux, CUDA's half arithmetic keeps denormals), and flushing would cost
    ``n 2^-14`` per test (0.047 for a row of 768 float16 outputs: up to 72% of attention x V's scale
    on the real fp16 MiniLM) where gradual underflow costs ``n 2^-25``. An absolute error made
    early passes through the later roundings of its side, each a factor ``1 + u_x``: the sum is
    multiplied by ``1 + max(gamma_a, gamma_b, gamma_c) <= (1 + u_x)^count``, and by ``1 + 2^-20``
    for eta's own rounding to float32 and its add (as ``_runtime_tau``'s slack). Returns ``inf``
    where ``tau_bound`` does (no finite bound).

    Not counted (docs/abft.md, "Thresholds"): subnormal *inputs* flushed to zero (DAZ) or cut to
    TF32/bfloat16 below their normal range, and a run-time checksum (``B e`` of an activation, the
    LB recovery's block sums of a weight, the column sums of ``A``) whose partial sum cancels to below 2^-126 under FTZ: their errors are
    proportional to the other operand, not absolute. The offline checksums' own underflow is covered
    where they are rounded (``graph.checksums.weight_checksum_vectors``)."""
    p = prec if isinstance(prec, Precision) else precision(prec)
    counts = rounding_counts(K, n_sum, p, extra_roundings, runtime_checksums)
    gammas = [_gamma(x) for x in counts]
    if not gammas[2] < 1.0 or float("inf") in gammas:
        return float("inf")
    n = max(int(n_sum), 1)
    return (1.0 + max(gammas)) * (1.0 + 2.0**-20) * _underflow_roundings(K, n, p, extra_roundings, ftz, ftz16)


def underflow_coefficients(prec: str | Precision = DEFAULT_PRECISION, extra_roundings: int = 0,
                           ftz: bool = True, ftz16: bool = False) -> tuple[float, float, float, float]:
    """``(const, per_K, per_n, per_Kn)`` with ``underflow_term``'s bracket ``== const + K per_K +
    n per_n + K n per_Kn`` (for ``n >= 1``): the graph evaluates it at a run-time ``K`` or ``n``
    (``passes.abft._runtime_eta``) and multiplies by the same factor of gammas."""
    p = prec if isinstance(prec, Precision) else precision(prec)
    f = lambda K, n: _underflow_roundings(K, n, p, extra_roundings, ftz, ftz16)  # noqa: E731
    c0 = f(0, 0)
    per_k, per_n = f(1, 0) - c0, f(0, 1) - c0
    return c0, per_k, per_n, f(1, 1) - c0 - per_k - per_n
