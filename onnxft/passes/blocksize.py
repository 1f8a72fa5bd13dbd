"""OptBlockSizeSelection (seed paper, Algorithm 2) with onnxft's real operation counts.

Cost model of LB-ABFT for one GEMM unit ``Y [M, N] = A [M, K] @ B [K, N]`` under the
operation-wise fault model (every bit of every product and partial sum flips with probability
``ber``; docs/fault_model.md). All counts are arithmetic operations (a MAC counts as 2):

- ``P(region faulty) = 1 - (1 - ber)^(ops * bits)`` with ``ops = rows * cols * 2K`` for the region's
  products and sums (the whole GEMM, or one ``b x b`` block);
- whole-GEMM detection (always run): ``detection_ops(M, N, K)``;
- block-wise detection (when the GEMM is flagged): ``block_detection_ops(M, N, K, b)``;
- recovery of one faulty block: ``2 b^2 K`` (``b x b`` outputs, ``K`` MACs each; edge blocks are
  recomputed at full size because their indices are clamped, so this is exact for the graph);
- ``cost(b) = detection + P_M * block_detection(b) + P_M * E[faulty blocks | GEMM faulty] * 2 b^2 K``
  where ``P_M * E[faulty blocks | GEMM faulty] = sum over blocks of P(block faulty)`` (a faulty
  block implies a faulty GEMM; edge blocks count with their real sizes).

Where this departs from the paper's Algorithm 2 (see docs/abft.md): the paper's
``blk = m/b x k/b x k/b`` and the sub-GEMM error-probability exponent
``ceil(m/b) ceil(n/b) ceil(p/b)`` are typos for "number of output blocks" and "operations of one
block"; its ``M_detection = n`` and ``SM_detection = b`` count one vector length, not operations.
"""
from __future__ import annotations

import math


def p_faulty(ops: float, ber: float, bits: int = 32) -> float:
    """Probability that at least one of ``ops * bits`` result bits flips."""
    if ber <= 0:
        return 0.0
    if ber >= 1:
        return 1.0
    return -math.expm1(ops * bits * math.log1p(-ber))


def detection_ops(M: int, N: int, K: int) -> int:
    """Whole-GEMM row-checksum test: row sums of Y (M*N), A @ Be and |A| @ |B|e (2 * 2MK),
    |A| (MK), subtract, abs, compare (3M)."""
    return M * N + 5 * M * K + 3 * M


def block_detection_ops(M: int, N: int, K: int, b: int) -> int:
    """Block-wise test with column blocks of width b: block sums of Y (M*N), A @ B_blk and
    |A| @ |B|_blk (2 * 2MK * nb), |A| (MK), subtract/abs/compare (3 M nb), row-block
    aggregation (M nb)."""
    nb = -(-N // b)
    return M * N + 4 * M * K * nb + M * K + 4 * M * nb


def lb_cost(M: int, N: int, K: int, ber: float, b: int, bits: int = 32) -> dict:
    """Expected operation counts of LB-ABFT with block size ``b`` (see the module docstring)."""
    p_m = p_faulty(M * N * 2 * K, ber, bits)
    bm, bn = min(b, M), min(b, N)  # a block never holds more than the matrix's rows/columns
    p_block = p_faulty(bm * bn * 2 * K, ber, bits)
    # expected faulty blocks, edge blocks with their real (smaller) sizes
    expected = 0.0
    for rows, n_r in _block_sizes(M, b):
        for cols, n_c in _block_sizes(N, b):
            expected += n_r * n_c * p_faulty(rows * cols * 2 * K, ber, bits)
    det = detection_ops(M, N, K)
    block_det = p_m * block_detection_ops(M, N, K, b)
    recovery = expected * 2 * bm * bn * K  # edge blocks are recomputed at full size (clamped indices)
    return {"detection": det, "block_detection": block_det, "recovery": recovery,
            "total": det + block_det + recovery, "p_gemm_faulty": p_m, "p_block_faulty": p_block,
            "expected_faulty_blocks": expected}


def _block_sizes(n: int, b: int) -> list[tuple[int, int]]:
    """(size, count) of the blocks of width b along a dimension of length n."""
    full, rest = divmod(n, b)
    return [(s, c) for s, c in ((b, full), (rest, 1 if rest else 0)) if c]


def standard_cost(M: int, N: int, K: int, ber: float, bits: int = 32, recompute_multiple: bool = True) -> dict:
    """Expected operation counts of standard ABFT: row test always; when it fires, the column
    test (N + 5NK + 3N ops); one faulty operation -> one recomputed element (2K); more -> the
    whole GEMM recomputed (2MNK), or nothing with ``recompute_multiple=False`` (``sec``: single-
    error correction only). (A single flipped bit is the common case of a single error.)"""
    n = M * N * 2 * K * bits
    p_m = p_faulty(M * N * 2 * K, ber, bits)
    p_one = 0.0 if ber <= 0 else n * ber * math.exp((n - 1) * math.log1p(-ber))
    p_more = max(p_m - p_one, 0.0)
    det = detection_ops(M, N, K)
    col = p_m * (M * N + 5 * N * K + 3 * N)
    recovery = p_one * 2 * K + (p_more * 2 * M * N * K if recompute_multiple else 0.0)
    return {"detection": det, "block_detection": col, "recovery": recovery,
            "total": det + col + recovery, "p_gemm_faulty": p_m}


def candidate_sizes(M: int, N: int) -> list[int]:
    """Powers of two, multiples of 8 and divisors of M and N, up to max(M, N)."""
    top = max(M, N, 1)
    c = {top}
    p = 1
    while p <= top:
        c.add(p)
        p *= 2
    c.update(range(8, top + 1, 8))
    for d in (M, N):
        c.update(i for i in range(1, d + 1) if d % i == 0)
    return sorted(x for x in c if 1 <= x <= top)


def opt_block_size(M: int, N: int, K: int, ber: float, bits: int = 32,
                   candidates=None) -> tuple[int, float]:
    """Algorithm 2: the block size with the least expected operations, and those operations.
    Ties go to the larger block (fewer blocks, same cost)."""
    if min(M, N, K) < 1:
        raise ValueError(f"GEMM dimensions must be positive, got M={M} N={N} K={K}")
    sizes = list(candidates) if candidates is not None else candidate_sizes(M, N)
    best = None
    for b in sizes:
        cost = lb_cost(M, N, K, ber, int(b), bits)["total"]
        if best is None or cost < best[1] or (cost == best[1] and b > best[0]):
            best = (int(b), cost)
    return best
