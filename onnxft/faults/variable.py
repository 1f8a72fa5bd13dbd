"""The variable-level transient fault model (docs/resiliency_accuracy.md).

A fault flips one bit of one *stored copy* of a variable of a GEMM or convolution: a weight, an
input activation, or a partial sum, held in a register of the accelerator. The chance that a copy
is hit is proportional to its bits times its residency (cycles it is held); the corrupted value is
used by every read of that copy after the flip. ``--hw`` picks the dataflow that sets copies,
residencies and read orders:

* ``ws:RxC`` weight-stationary array (R rows over K, C columns over N),
* ``os:RxC`` output-stationary (R over M, C over N),
* ``is:RxC`` input-stationary (R over K, C over M),
* ``gpu:TMxTNxTK`` register-tiled GEMM (a TM x TN output tile per thread block, K in chunks of TK),
* ``equal``: every weight and input element of every GEMM equally likely, a flip corrupting all
  its reads (the software-level formulation the seed calls wrong).

Every GEMM is seen per item (one inference) as ``G`` products ``Y[g] = A[g] B[g]`` with ``A[g]``
``M x K`` and ``B[g]`` ``K x N``: a MatMul with a 2-D weight is one product over all its rows, a
batched MatMul one product per batch index, a Conv one product per group over its im2col matrix
(``M`` output positions, ``K = C_in/group x kH x kW``, the im2col entries being the streamed input
copies). The model is exact for one fault per inference: a corrupted read becomes a product fault
whose XOR mask turns the clean product ``a x b`` into ``a' x b`` (or ``a x b'``), computed from the
operands of a fault-free run (``OperandReader``), which are the operands the faulted run sees when
the one fault is the only one. A partial-sum copy is an existing partial-sum fault.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx

from .sampling import Faults, SitePlan
from .sites import SiteTable

HW_KINDS = ("ws", "os", "is", "gpu", "equal")
VARIABLE_KINDS = ("weight", "input", "psum")
OPERAND_BITS = {"fp32": 32, "fp16": 16, "int8": 8}  # bits of a stored weight / input by the site's format


@dataclass(frozen=True)
class Hardware:
    kind: str
    dims: tuple[int, ...] = ()

    def __str__(self) -> str:
        return self.kind if self.kind == "equal" else f"{self.kind}:{'x'.join(map(str, self.dims))}"


def parse_hw(text: str) -> Hardware:
    """``ws:128x128``, ``os:RxC``, ``is:RxC``, ``gpu:TMxTNxTK`` or ``equal``."""
    text = text.strip().lower()
    if text == "equal":
        return Hardware("equal")
    m = re.fullmatch(r"(ws|os|is|gpu):(\d+(?:x\d+)*)", text)
    dims = tuple(int(v) for v in m.group(2).split("x")) if m else ()
    if not m or len(dims) != (3 if m.group(1) == "gpu" else 2) or min(dims) < 1:
        raise ValueError(f"--hw {text!r}: expected ws:RxC, os:RxC, is:RxC, gpu:TMxTNxTK or equal")
    return Hardware(m.group(1), dims)


# ---------------------------------------------------------------------------------------------
# Residency: exposure (copies x cycles) of each variable kind of one M x N x K product
# ---------------------------------------------------------------------------------------------

def _chunks(k: int, tk: int) -> np.ndarray:
    """Length of the K chunk that each reduction index belongs to."""
    lens = np.full(k, tk)
    last = k % tk
    if last:
        lens[k - last:] = last
    return lens


def exposure(hw: Hardware, m: int, n: int, k: int) -> dict[str, int]:
    """Register-cycles (sum over copies of their residency) of each variable kind of one product.
    Under ``equal`` it is the number of variables instead (no partial sums)."""
    if hw.kind == "equal":
        return {"weight": k * n, "input": m * k, "psum": 0}
    psum = m * n * (k - 1)  # s_1 .. s_{K-1}, one cycle each in an accumulator register
    if hw.kind in ("ws", "os", "is"):
        # each operand value is read once by each of the products it takes part in, one cycle per
        # register: whatever the tiling, the copies of one operand add up to its reads
        return {"weight": k * n * m, "input": m * k * n, "psum": psum}
    tm, tn, tk = hw.dims
    chunk_sq = int(_chunks(k, tk).sum())  # sum over k of the length of its chunk = sum of squared chunk lengths
    return {"weight": n * -(-m // tm) * chunk_sq, "input": m * -(-n // tn) * chunk_sq, "psum": psum}


def _tile_end(start: np.ndarray, size: int, tile: int) -> np.ndarray:
    return np.minimum((start // tile + 1) * tile, size)


def _register_tile(rng: np.random.Generator, k: int, tk: int, extent: int, tile: int, count: int):
    """gpu: a copy of an operand is resident in one register tile (``tile`` of the ``extent`` rows or
    columns) for its K chunk and is read at step ``k mod tk`` of it, so a flip during the chunk
    corrupts the tile's reads only if it comes first. Returns (k index, first, end of the range)."""
    lens = _chunks(k, tk)
    kk = rng.choice(k, count, p=lens / lens.sum())
    index = rng.integers(0, -(-extent // tile), count)
    hit = rng.integers(0, lens[kk]) <= kk % tk
    first = index * tile
    return kk, first, np.where(hit, np.minimum(first + tile, extent), first)


def corrupted_reads(hw: Hardware, kind: str, m: int, n: int, k: int, rng: np.random.Generator, count: int):
    """Draw ``count`` faults of one kind in one product: the fault model's law within the kind.

    Returns (index of the variable: (row, k) for inputs or (k, col) for weights, first and end of
    the corrupted range of rows (weights) or columns (inputs)); an empty range is a masked fault."""
    d = hw.dims
    if kind == "weight":
        kk, col = rng.integers(0, k, count), rng.integers(0, n, count)
        if hw.kind == "equal":
            return kk, col, np.zeros(count, np.int64), np.full(count, m)
        if hw.kind == "ws":  # stationary during the M rows streamed through: rows from the flip on
            t = rng.integers(0, m, count)
            return kk, col, t, np.full(count, m)
        if hw.kind in ("os", "is"):  # passes through the tile of rows (R of os, C of is), a cycle each
            tile = d[0] if hw.kind == "os" else d[1]
            start = rng.integers(0, m, count)
            return kk, col, start, _tile_end(start, m, tile)
        kk, first, end = _register_tile(rng, k, d[2], m, d[0], count)  # gpu: one copy per row tile
        return kk, col, first, end
    row, kk = rng.integers(0, m, count), rng.integers(0, k, count)
    if hw.kind in ("equal",):
        return row, kk, np.zeros(count, np.int64), np.full(count, n)
    if hw.kind == "is":  # stationary while the N columns of weights stream past
        t = rng.integers(0, n, count)
        return row, kk, t, np.full(count, n)
    if hw.kind in ("ws", "os"):  # passes through the C columns of its column tile
        start = rng.integers(0, n, count)
        return row, kk, start, _tile_end(start, n, d[1])
    kk, first, end = _register_tile(rng, k, d[2], n, d[1], count)  # gpu: one copy per column tile
    return row, kk, first, end


# ---------------------------------------------------------------------------------------------
# Sites as products, and their operands
# ---------------------------------------------------------------------------------------------

@dataclass
class Product:
    """One site's GEMM view per item: ``groups`` products of M x N x K, and how to read them."""

    site: int
    groups: int
    m: int
    n: int
    k: int
    shared_b: bool  # MatMul with a 2-D weight (one B for all rows)
    conv: bool


def product_of(index: int, plan: SitePlan) -> tuple[Product | None, str]:
    """The product view of a gemm/conv site, or (None, why not)."""
    site = plan.site
    if site.kind == "elementwise":
        return None, "elementwise"
    if site.format == "int8" and site.widths["product"] < 32:
        return None, "int8 products narrower than 32 bits (the variable-level model runs with 32-bit products)"
    if site.recovery_of:
        return None, "ABFT recovery site"
    if site.kind == "conv":
        co, cg, kh, kw = plan.b_shape
        group = int(plan.conv["group"])
        _, _, oh, ow = plan.out_shape
        return Product(index, group, oh * ow, co // group, cg * kh * kw, False, True), ""
    a, b, y = list(plan.a_shape), list(plan.b_shape), list(plan.out_shape)
    if plan.items < 1 or len(a) != len(y) or len(a) < 2:
        return None, "operand A does not carry the batch axes of the output"
    m, n, k = y[-2], y[-1], plan.k
    if len(b) == 2:
        return Product(index, 1, int(np.prod(y[1:-1])), n, k, True, False), ""
    if len(b) == len(y) and b[:-2] == y[:-2]:
        return Product(index, int(np.prod(y[1:-2], dtype=np.int64)), m, n, k, False, False), ""
    return None, "broadcast batch axes between the operands"


class OperandReader:
    """Operands of every gemm/conv site in a fault-free run: the plain injection graph (no
    fault-free fast path, so fused ops run exactly as in a faulted run) with each site's operand
    tensors as extra outputs."""

    def __init__(self, injection_graph: onnx.ModelProto, provider: str = "auto", threads: int | None = None):
        table = SiteTable.from_model(injection_graph)
        main = {n.name: n for n in injection_graph.graph.node}
        producer = {o: n for n in injection_graph.graph.node for o in n.output}
        inits = {t.name: t for t in injection_graph.graph.initializer}
        self.names: dict[int, tuple[str, str]] = {}
        # int8 sites: the stored operands are the 8-bit integers that DequantizeLinear reads, with
        # their zero points (constants)
        self.zero_points: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for i, s in enumerate(table.sites):
            if s.kind == "elementwise":
                continue
            a, b = main.get(f"{s.node}/onnxft/shape1"), main.get(f"{s.node}/onnxft/shape2")
            if a is None or b is None:
                continue
            names = (a.input[0], b.input[0])
            if s.format == "int8":
                dqs = [producer.get(t) for t in names]
                if any(d is None or d.op_type != "DequantizeLinear" or len(d.input) < 3 or d.input[2] not in inits
                       for d in dqs):
                    continue
                names = (dqs[0].input[0], dqs[1].input[0])
                self.zero_points[i] = tuple(onnx.numpy_helper.to_array(inits[d.input[2]]).astype(np.int64)
                                            for d in dqs)
            self.names[i] = names
        m = onnx.ModelProto()
        m.CopyFrom(injection_graph)
        g = m.graph
        types = {v.name: v for v in list(g.input) + list(g.value_info)}
        types.update({t.name: onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                      for t in g.initializer})
        present = {o.name for o in g.output}
        self.outputs = []
        for i, (a, b) in list(self.names.items()):
            if a not in types or b not in types:  # no type known: leave the site to the skipped list
                del self.names[i]
                continue
            for t in (a, b):
                if t not in present:
                    g.output.append(types[t])
                    present.add(t)
                self.outputs.append(t)
        self.model = m
        self.provider, self.threads = provider, threads
        self._sessions: dict = {}
        self.table = table

    def read(self, feeds: dict[str, np.ndarray], fault_feeds: dict[str, np.ndarray] | None = None
             ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Every readable site's operands in a run with these inputs: fault-free, or with
        ``fault_feeds`` (``sampling.fault_feeds``) applied, for operands downstream of other faults."""
        from ..runtime.session import make_session, with_static_inputs

        key = tuple((k, np.shape(v)) for k, v in sorted(feeds.items()))
        if key not in self._sessions:
            self._sessions[key] = make_session(with_static_inputs(self.model, feeds), self.provider, self.threads,
                                               level="basic")
        names = sorted(set(self.outputs))
        full = dict(feeds)
        full.update(fault_feeds or {})
        values = dict(zip(names, self._sessions[key].run(names, full)))
        return {i: (values[a], values[b]) for i, (a, b) in self.names.items()}


def _bits32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).view(np.uint32)


@dataclass(frozen=True)
class VariableFault:
    """One variable-level fault. ``weight``: B[group][index0, index1] (k, column) flipped, read by
    rows ``first .. end-1``; ``input``: A[group][index0, index1] (row, k) flipped, read by columns
    ``first .. end-1``; ``psum``: s_first of output (row index0, column index1). ``first == end``:
    masked (the copy is not read after the flip)."""

    site: int
    item: int
    kind: str
    group: int
    index0: int
    index1: int
    first: int
    end: int
    bit: int


class VariableSpace:
    """The variable-level model of one batch, cut into strata (site, kind, bit): for
    ``campaigns.ra`` k faults per inference (its interface: ``strata``, ``draw_tuples``; the batch's
    fault-free operands are read once, on the first draw, or by ``prepare(feeds)``), for ``eval
    --fault-model variable`` every stored bit-cycle an independent Bernoulli(BER) event
    (``sample_ber``, ``inject``).

    ``kinds``: the variable kinds that can be hit (weight, input, psum; default all).

    Sites the model does not cover (elementwise ops, int8 GEMMs with products under 32 bits, broadcast
    operands, GEMMs inside a fused op) are listed in ``skipped``: RA is then conditional on the fault
    being in a covered site, and eval puts no faults there."""

    def __init__(self, plans: list[SitePlan], hw: Hardware, reader: OperandReader,
                 kinds: tuple[str, ...] = VARIABLE_KINDS):
        from ..campaigns.ra import Strata

        bad = sorted(set(kinds) - set(VARIABLE_KINDS))
        if bad or not kinds:
            raise ValueError(f"variable kinds {', '.join(bad) or '(none)'}: choose from weight, input, psum")
        self.plans, self.hw, self.reader = plans, hw, reader
        self.products: dict[int, Product] = {}
        self.skipped: list[tuple[str, str]] = []
        site, kind, bit, mass, widths, positions, floating = [], [], [], [], [], [], []
        for i, plan in enumerate(plans):
            prod, why = product_of(i, plan)
            if prod is None:
                if why != "elementwise":
                    self.skipped.append((plan.site.node, why))
                continue
            if i not in reader.names:
                self.skipped.append((plan.site.node, "inside a fused op, or int8 operands without a constant "
                                                     "zero point (operands not readable)"))
                continue
            if plan.site.scale == 0:
                continue
            self.products[i] = prod
            exp = exposure(hw, prod.m, prod.n, prod.k)
            for kd, name in enumerate(VARIABLE_KINDS):
                if exp[name] <= 0 or name not in kinds:
                    continue
                width = plan.site.widths["sum"] if name == "psum" else OPERAND_BITS[plan.site.format]
                # equal: every variable equally likely, then a bit of it; else bits x residency
                per_bit = exp[name] * prod.groups / (width if hw.kind == "equal" else 1)
                site += [i] * width
                kind += [kd] * width
                bit += list(range(width))
                mass += [per_bit] * width
                widths += [width] * width
                floating += [plan.site.format != "int8"] * width
                # stored bit-cycles of this bit position per item (equal: stored bits, one per variable)
                positions += [exp[name] * prod.groups] * width
        if not mass:
            raise ValueError("the variable-level model found no fp32/fp16/int8 GEMM/Conv site whose operands it can "
                             "read "
                             f"(variable kinds: {', '.join(kinds)})")
        mass = np.array(mass, np.float64)
        self.strata = Strata(np.array(site, np.int64), np.array(kind, np.int64), np.array(bit, np.int64),
                             mass / mass.sum(), VARIABLE_KINDS, np.array(widths, np.int64), np.array(floating, bool))
        self.positions = np.array(positions, np.int64)
        self.scale = np.array([plans[i].site.scale for i in site], np.float64)
        self.operands: dict | None = None

    def prepare(self, feeds) -> None:
        self.operands = self.reader.read(feeds)

    def draw(self, strata: np.ndarray, items: np.ndarray, rng: np.random.Generator) -> Faults:
        parts = [self.draw_one(int(s), int(i), rng) for s, i in zip(strata.tolist(), items.tolist())]
        return Faults.concat(parts)

    def distinct_probability(self, k: int) -> float:
        """RA_k under this model is defined with k independent faults (the law of k upsets of a
        Poisson process over the stored bit-cycles), so every tuple is in the law: 1."""
        return 1.0

    def draw_tuples(self, strata: np.ndarray, rng: np.random.Generator, feeds, plans) -> tuple[Faults, np.ndarray]:
        """``strata[i]``: the k faults of item i, each placed in its stratum (``describe``), applied
        together exactly (``inject``). Returns (faults, every item valid)."""
        drawn = [self.describe(int(s), i, rng) for i, row in enumerate(strata.tolist()) for s in row]
        return self.inject(drawn, feeds, plans), np.ones(len(strata), bool)

    def draw_one(self, stratum: int, item: int, rng: np.random.Generator) -> Faults:
        return self.apply(self.describe(stratum, item, rng))

    # eval at a BER ----------------------------------------------------------------------------
    def expected_faults(self, ber: float, items: int) -> float:
        """Expected stored-bit flips of one batch at ``ber``."""
        return float(np.sum(self.positions * np.minimum(ber * self.scale, 1.0)) * items)

    def sample_ber(self, ber: float, items: int, rng: np.random.Generator) -> list["VariableFault"]:
        """Every stored bit-cycle (under ``equal``: every stored bit) of every item flips
        independently with probability ``ber`` (times the site's BER scale): per item and stratum
        ``Binomial(bit-cycles, ber)`` flips, each placed by the stratum's own law (``describe``)."""
        if ber <= 0:
            return []
        p = np.minimum(ber * self.scale, 1.0)
        counts = rng.binomial(np.broadcast_to(self.positions, (items, len(p))), np.broadcast_to(p, (items, len(p))))
        faults = []
        for item, s in zip(*np.nonzero(counts)):
            faults += [self.describe(int(s), int(item), rng) for _ in range(int(counts[item, s]))]
        return faults

    def inject(self, faults: list["VariableFault"], feeds, plans: list[SitePlan]) -> Faults:
        """The product faults that have exactly the effect of ``faults`` (any number per item).

        The masks of a site's corrupted products come from the operands that site sees in the
        faulted run, which other faults upstream may have changed. So: masks from the fault-free
        operands; then, while some item has faults at two or more sites, run the graph with the
        masks, re-read every operand and recompute the masks, until they no longer change (a
        fixed point: every site's masks are computed from the operands of the very run they are
        applied in; a site's operands depend only on sites before it, so the masks settle after at
        most one round per site in a chain)."""
        from .sampling import fault_feeds

        if self.operands is None:
            self.prepare(feeds)
        current = self.apply_many(faults)
        per_item: dict[int, set] = {}
        for f in faults:
            per_item.setdefault(f.item, set()).add(f.site)
        if all(len(s) < 2 for s in per_item.values()):
            return current
        for _ in range(len(self.products) + 1):
            operands = self.reader.read(feeds, fault_feeds(plans, current))
            nxt = self.apply_many(faults, operands)
            if _same_faults(nxt, current):
                return nxt
            current = nxt
        raise RuntimeError("operand masks did not settle (a cycle between fault sites?)")

    # one fault ----------------------------------------------------------------------------------
    def describe(self, stratum: int, item: int, rng: np.random.Generator) -> "VariableFault":
        """Draw one fault within a stratum: which copy, and which of its reads it corrupts."""
        st = self.strata
        i, kd, b = int(st.site[stratum]), VARIABLE_KINDS[int(st.kind[stratum])], int(st.bit[stratum])
        p = self.products[i]
        g = int(rng.integers(0, p.groups))
        if kd == "psum":  # s_j, j = 1 .. K-1
            row, col, j = int(rng.integers(0, p.m)), int(rng.integers(0, p.n)), int(rng.integers(1, p.k))
            return VariableFault(i, item, kd, g, row, col, j, j + 1, b)
        idx0, idx1, first, end = corrupted_reads(self.hw, kd, p.m, p.n, p.k, rng, 1)
        return VariableFault(i, item, kd, g, int(idx0[0]), int(idx1[0]), int(first[0]), int(end[0]), b)

    def apply(self, f: "VariableFault") -> Faults:
        """The product (or partial-sum) faults that have exactly this fault's effect."""
        return self.apply_many([f])

    def apply_many(self, faults: list["VariableFault"], operands: dict | None = None) -> Faults:
        """Product and partial-sum faults with the effect of ``faults`` given the operands each site
        reads (default: the fault-free ones of ``prepare``).

        Reads of one product by several faults are merged first: the operands' flips are XORed (a
        bit flipped twice in one copy is restored), and the product's mask turns ``a x b`` into
        ``a' x b'`` with both operands as corrupted, so a weight fault and an input fault on the same
        product compose exactly."""
        operands = self.operands if operands is None else operands
        parts = []
        reads: dict[tuple[int, int, int], list] = {}
        psums: dict[tuple, int] = {}
        for f in faults:
            p = self.products[f.site]
            if f.kind == "psum":  # the operation-wise partial-sum fault on s_j (step K-1+j)
                e = int(self._element(p, f.group, np.array([f.index0]), np.array([f.index1]))[0])
                key = (f.site, f.item, e, p.k - 1 + f.first, f.bit)
                psums[key] = psums.get(key, 0) ^ 1  # the same bit flipped twice is restored
                continue
            if f.end <= f.first:
                continue  # the flip came after the copy's last read: masked
            span = np.arange(f.first, f.end)
            one = np.ones(len(span), np.int64)
            flip = np.uint64(1) << np.uint64(f.bit)
            if f.kind == "weight":  # B[k, col] read by rows first..end-1
                rows, cols, kk = span, one * f.index1, one * f.index0
                am, bm = np.zeros(len(span), np.uint64), np.full(len(span), flip)
            else:  # A[row, k] read by columns first..end-1
                rows, cols, kk = one * f.index0, span, one * f.index1
                am, bm = np.full(len(span), flip), np.zeros(len(span), np.uint64)
            reads.setdefault((f.site, f.item, f.group), []).append((rows, cols, kk, am, bm))
        kept = [key for key, odd in psums.items() if odd]
        if kept:
            parts.append(Faults(*(np.array(c, np.int64) for c in zip(*kept))))
        for (site, item, g), lst in sorted(reads.items()):
            p = self.products[site]
            rows, cols, kk, am, bm = (np.concatenate([r[c] for r in lst]) for c in range(5))
            key = (rows * p.n + cols) * p.k + kk
            uniq, first, inv = np.unique(key, return_index=True, return_inverse=True)
            a_mask, b_mask = np.zeros(len(uniq), np.uint64), np.zeros(len(uniq), np.uint64)
            np.bitwise_xor.at(a_mask, inv, am)
            np.bitwise_xor.at(b_mask, inv, bm)
            rows, cols, kk = rows[first], cols[first], kk[first]
            a_op, b_op = operands[site]
            if site in self.reader.zero_points:
                masks = self._int_masks(p, site, item, g, rows, cols, kk, a_mask, b_mask, a_op, b_op)
            elif self.plans[site].site.format == "fp16":
                # binary16 operands; the product is the float32 product rounded once to binary16
                # (exact before rounding), and the mask is on its 16 bits
                a = np.float16(self._a(p, a_op, item, g, rows, kk))
                b = np.float16(self._b(p, b_op, item, g, kk, cols))
                with np.errstate(all="ignore"):
                    new = (_xor16(a, a_mask).astype(np.float32)
                           * _xor16(b, b_mask).astype(np.float32)).astype(np.float16)
                    old = (a.astype(np.float32) * b.astype(np.float32)).astype(np.float16)
                masks = (new.view(np.uint16) ^ old.view(np.uint16)).astype(np.uint32)
            else:
                with np.errstate(all="ignore"):
                    a = self._a(p, a_op, item, g, rows, kk)
                    b = self._b(p, b_op, item, g, kk, cols)
                    new = _xor32(a, a_mask) * _xor32(b, b_mask)
                    old = a * b
                masks = _bits32(old) ^ _bits32(new)
            parts.append(_mask_rows(site, item, self._element(p, g, rows, cols), kk, masks))
        return Faults.concat(parts)

    def _int_masks(self, p: Product, site: int, item: int, g: int, rows, cols, kk, a_mask, b_mask, a_op, b_op):
        """int8: products (qa - za)(qb - zb) of the stored 8-bit values; the flips are on the 8-bit
        patterns of qa and qb; the mask turns the 32-bit two's complement product into the new one
        (exact: |product| < 2^16)."""
        za, zb = self.reader.zero_points[site]
        za = int(np.reshape(za, -1)[0])
        z = np.reshape(zb, -1)
        z = z[(g * p.n + cols) % len(z)] if p.conv else z[cols % len(z)]
        qa = self._a(p, a_op, item, g, rows, kk, pad=za).astype(np.int64)
        qb = np.asarray(self._b(p, b_op, item, g, kk, cols, raw=True), np.int64)
        old = (qa - za) * (qb - z)
        new = (_flip8(qa, a_mask, a_op.dtype == np.int8) - za) * (_flip8(qb, b_mask, b_op.dtype == np.int8) - z)
        return ((old & 0xFFFFFFFF) ^ (new & 0xFFFFFFFF)).astype(np.uint32)

    # operand access per item ----------------------------------------------------------------
    def _element(self, p: Product, g: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        if p.conv:  # output [C_out, OH, OW]: channel g * N + col, position row
            return ((g * p.n + cols) * p.m + rows).astype(np.int64)
        return ((g * p.m + rows) * p.n + cols).astype(np.int64)

    def _a(self, p: Product, a_op: np.ndarray, item: int, g: int, rows: np.ndarray, kk: np.ndarray,
           pad=None) -> np.ndarray:
        """A[g][rows, kk] as stored (float32, or the raw integers with ``pad`` for padding)."""
        dtype = np.float32 if pad is None else np.int64
        if not p.conv:
            return np.asarray(a_op[item], dtype).reshape(p.groups, -1, p.k)[g][rows, kk] if not p.shared_b \
                else np.asarray(a_op[item], dtype).reshape(-1, p.k)[rows, kk]
        plan = self.plans[p.site]
        _, c, hgt, wid = plan.a_shape
        _, cg, kh, kw = plan.b_shape
        _, _, oh, ow = plan.out_shape
        ci, rem = np.divmod(kk, kh * kw)
        ki, kj = np.divmod(rem, kw)
        (sh, sw), (dh, dw) = plan.conv["strides"], plan.conv["dilations"]
        pt, pl = plan.conv["pads2"]
        orow, ocol = np.divmod(rows, ow)
        ih, iw = orow * sh - pt + ki * dh, ocol * sw - pl + kj * dw
        inside = (ih >= 0) & (ih < hgt) & (iw >= 0) & (iw < wid)
        x = np.asarray(a_op[item], dtype)
        vals = x[g * cg + ci, np.clip(ih, 0, hgt - 1), np.clip(iw, 0, wid - 1)]
        # padding streams a zero: 0.0, or the zero point of an integer operand
        return np.where(inside, vals, dtype(0) if pad is None else pad).astype(dtype)

    def _b(self, p: Product, b_op: np.ndarray, item: int, g: int, kk: int, cols, raw: bool = False) -> np.ndarray:
        """B[g][kk, cols] (a scalar for a scalar column); ``raw``: the stored integers."""
        dtype = np.int64 if raw else np.float32
        if p.conv:  # weight [C_out, C_in/group, kH, kW]: column n of group g is channel g * N + n
            w = np.asarray(b_op, dtype).reshape(b_op.shape[0], -1)[g * p.n + np.asarray(cols), kk]
        elif p.shared_b:
            w = np.asarray(b_op, dtype)[kk, cols]
        else:
            w = np.asarray(b_op[item], dtype).reshape(p.groups, p.k, p.n)[g, kk, cols]
        return dtype(w) if np.ndim(w) == 0 else w.astype(dtype)


def _flip8(q, mask, signed: bool):
    """XOR ``mask`` into the 8-bit pattern of ``q`` (int8 two's complement or uint8)."""
    x = (np.asarray(q, np.int64) & 0xFF) ^ np.asarray(mask, np.int64)
    return np.where(x >= 128, x - 256, x) if signed else x


def _xor16(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return (np.asarray(x, np.float16).view(np.uint16) ^ np.asarray(mask, np.uint16)).view(np.float16)


def _xor32(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return (_bits32(x) ^ np.asarray(mask, np.uint32)).view(np.float32)


def _same_faults(a: Faults, b: Faults) -> bool:
    return len(a) == len(b) and all(np.array_equal(getattr(a, f), getattr(b, f))
                                    for f in ("site", "item", "element", "step", "bit"))


def _mask_rows(site: int, item: int, elements: np.ndarray, step, masks: np.ndarray) -> Faults:
    """Product faults with these XOR masks: one row per set bit (the feeds merge a product's bits
    back into one mask); ``step``: the reduction index of each product (or one for all)."""
    masks = np.asarray(masks, np.uint32)
    step = np.broadcast_to(np.asarray(step, np.int64), masks.shape)
    bits = np.arange(32, dtype=np.uint32)
    set_ = ((masks[:, None] >> bits[None, :]) & np.uint32(1)).astype(bool)
    row, bit = np.nonzero(set_)
    n = len(row)
    return Faults(np.full(n, site, np.int64), np.full(n, item, np.int64), elements[row].astype(np.int64),
                  step[row].astype(np.int64), bit.astype(np.int64))


def parse_variables(text) -> tuple[str, ...]:
    """``--variables``: comma-separated weight, activation (or input), psum, or all; in
    ``VARIABLE_KINDS`` order."""
    if text is None:
        return VARIABLE_KINDS
    names = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if "all" in names:
        return VARIABLE_KINDS
    names = ["input" if t in ("activation", "activations", "input", "inputs") else t.rstrip("s") for t in names]
    bad = [t for t in names if t not in VARIABLE_KINDS]
    if bad or not names:
        raise ValueError(f"--variables {text!r}: choose from weight, activation, psum or all (comma-separated)")
    return tuple(k for k in VARIABLE_KINDS if k in names)
