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
        tm, _, tk = d  # gpu: one copy per row tile, resident for its K chunk, read at step k mod TK
        lens = _chunks(k, tk)
        kk = rng.choice(k, count, p=lens / lens.sum())
        tile = rng.integers(0, -(-m // tm), count)
        hit = rng.integers(0, lens[kk]) <= kk % tk
        first = tile * tm
        return kk, col, first, np.where(hit, np.minimum(first + tm, m), first)
    row, kk = rng.integers(0, m, count), rng.integers(0, k, count)
    if hw.kind in ("equal",):
        return row, kk, np.zeros(count, np.int64), np.full(count, n)
    if hw.kind == "is":  # stationary while the N columns of weights stream past
        t = rng.integers(0, n, count)
        return row, kk, t, np.full(count, n)
    if hw.kind in ("ws", "os"):  # passes through the C columns of its column tile
        start = rng.integers(0, n, count)
        return row, kk, start, _tile_end(start, n, d[1])
    _, tn, tk = d
    lens = _chunks(k, tk)
    kk = rng.choice(k, count, p=lens / lens.sum())
    tile = rng.integers(0, -(-n // tn), count)
    hit = rng.integers(0, lens[kk]) <= kk % tk
    first = tile * tn
    return row, kk, first, np.where(hit, np.minimum(first + tn, n), first)


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
    if site.format == "fp16":
        return None, "fp16 operands are not modelled yet (fp32 and int8 are)"
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

    def read(self, feeds: dict[str, np.ndarray]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        from ..runtime.session import make_session, with_static_inputs

        key = tuple((k, np.shape(v)) for k, v in sorted(feeds.items()))
        if key not in self._sessions:
            self._sessions[key] = make_session(with_static_inputs(self.model, feeds), self.provider, self.threads,
                                               level="basic")
        names = sorted(set(self.outputs))
        values = dict(zip(names, self._sessions[key].run(names, feeds)))
        return {i: (values[a], values[b]) for i, (a, b) in self.names.items()}


def _bits32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).view(np.uint32)


def _flip32(x: np.ndarray, bit: np.ndarray) -> np.ndarray:
    return (_bits32(x) ^ (np.uint32(1) << bit.astype(np.uint32))).view(np.float32)


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
    """One fault of the variable-level model, cut into strata (site, kind, bit) for
    ``campaigns.ra`` (its interface: ``strata``, ``prepare(feeds)``, ``draw(strata, items, rng)``).

    Sites the model does not cover (elementwise ops, non-fp32 GEMMs, broadcast operands, GEMMs
    inside a fused op) are listed in ``skipped``: RA is then conditional on the fault being in a
    covered site."""

    def __init__(self, plans: list[SitePlan], hw: Hardware, reader: OperandReader):
        from ..campaigns.ra import Strata

        self.plans, self.hw, self.reader = plans, hw, reader
        self.products: dict[int, Product] = {}
        self.skipped: list[tuple[str, str]] = []
        site, kind, bit, mass, widths = [], [], [], [], []
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
                if exp[name] <= 0:
                    continue
                width = plan.site.widths["sum"] if name == "psum" else (8 if plan.site.format == "int8" else 32)
                # equal: every variable equally likely, then a bit of it; else bits x residency
                per_bit = exp[name] * prod.groups / (width if hw.kind == "equal" else 1)
                site += [i] * width
                kind += [kd] * width
                bit += list(range(width))
                mass += [per_bit] * width
                widths += [width] * width
        if not mass:
            raise ValueError("the variable-level model found no fp32 GEMM/Conv site whose operands it can read")
        mass = np.array(mass, np.float64)
        self.strata = Strata(np.array(site, np.int64), np.array(kind, np.int64), np.array(bit, np.int64),
                             mass / mass.sum(), VARIABLE_KINDS, np.array(widths, np.int64))
        self.operands: dict | None = None

    def prepare(self, feeds) -> None:
        self.operands = self.reader.read(feeds)

    def draw(self, strata: np.ndarray, items: np.ndarray, rng: np.random.Generator) -> Faults:
        parts = [self.draw_one(int(s), int(i), rng) for s, i in zip(strata.tolist(), items.tolist())]
        return Faults.concat(parts)

    def draw_one(self, stratum: int, item: int, rng: np.random.Generator) -> Faults:
        return self.apply(self.describe(stratum, item, rng))

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
        p = self.products[f.site]
        if f.kind == "psum":  # the operation-wise partial-sum fault on s_j (step K-1+j)
            e = self._element(p, f.group, np.array([f.index0]), np.array([f.index1]))
            return Faults(np.array([f.site]), np.array([f.item]), e, np.array([p.k - 1 + f.first]), np.array([f.bit]))
        if f.end <= f.first:
            return Faults.empty()  # the flip came after the copy's last read: masked
        a_op, b_op = self.operands[f.site]
        bit = np.array(f.bit)
        if f.site in self.reader.zero_points:
            return self._apply_int(p, f, a_op, b_op)
        with np.errstate(all="ignore"):
            if f.kind == "weight":
                kk, col = f.index0, f.index1
                rows = np.arange(f.first, f.end)
                a = self._a(p, a_op, f.item, f.group, rows, np.full(len(rows), kk))
                w = self._b(p, b_op, f.item, f.group, kk, col)
                new, old = a * _flip32(w, bit), a * np.float32(w)
                elements = self._element(p, f.group, rows, np.full(len(rows), col))
            else:
                row, kk = f.index0, f.index1
                cols = np.arange(f.first, f.end)
                a = self._a(p, a_op, f.item, f.group, np.array([row]), np.array([kk]))[0]
                w = self._b(p, b_op, f.item, f.group, kk, cols)
                new, old = _flip32(a, bit) * w, np.float32(a) * w
                elements = self._element(p, f.group, np.full(len(cols), row), cols)
        return _mask_rows(f.site, f.item, elements, kk, _bits32(old) ^ _bits32(new))

    def _apply_int(self, p: Product, f: "VariableFault", a_op, b_op) -> Faults:
        """int8: products (qa - za)(qb - zb) of the stored 8-bit values; the flip is on the 8-bit
        pattern of qa or qb; the mask turns the 32-bit two's complement product into the new one
        (exact: |product| < 2^16)."""
        za, zb = self.reader.zero_points[f.site]
        za = int(np.reshape(za, -1)[0])
        signed_a, signed_b = a_op.dtype == np.int8, b_op.dtype == np.int8

        def zb_of(cols):
            z = np.reshape(zb, -1)
            return z[(f.group * p.n + cols) % len(z)] if p.conv else z[cols % len(z)]

        if f.kind == "weight":
            kk, col = f.index0, f.index1
            rows = np.arange(f.first, f.end)
            qa = self._a(p, a_op, f.item, f.group, rows, np.full(len(rows), kk), pad=za).astype(np.int64)
            qb = np.int64(self._b(p, b_op, f.item, f.group, kk, col, raw=True))
            z = zb_of(np.array([col]))[0]
            old = (qa - za) * (qb - z)
            new = (qa - za) * (_flip8(qb, f.bit, signed_b) - z)
            elements = self._element(p, f.group, rows, np.full(len(rows), col))
        else:
            row, kk = f.index0, f.index1
            cols = np.arange(f.first, f.end)
            qa = np.int64(self._a(p, a_op, f.item, f.group, np.array([row]), np.array([kk]), pad=za)[0])
            qb = self._b(p, b_op, f.item, f.group, kk, cols, raw=True).astype(np.int64)
            z = zb_of(cols)
            old = (qa - za) * (qb - z)
            new = (_flip8(qa, f.bit, signed_a) - za) * (qb - z)
            elements = self._element(p, f.group, np.full(len(cols), row), cols)
        mask = (old.astype(np.int64) & 0xFFFFFFFF) ^ (new.astype(np.int64) & 0xFFFFFFFF)
        return _mask_rows(f.site, f.item, elements, kk, mask.astype(np.uint32))

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


def _flip8(q, bit: int, signed: bool):
    """Flip bit ``bit`` of the 8-bit pattern of ``q`` (int8 two's complement or uint8)."""
    x = (np.asarray(q, np.int64) & 0xFF) ^ (1 << bit)
    return np.where(x >= 128, x - 256, x) if signed else x


def _mask_rows(site: int, item: int, elements: np.ndarray, step: int, masks: np.ndarray) -> Faults:
    """Product faults with these XOR masks: one row per set bit (the feeds merge a product's bits
    back into one mask)."""
    bits = np.arange(32, dtype=np.uint32)
    set_ = ((masks[:, None] >> bits[None, :]) & np.uint32(1)).astype(bool)
    row, bit = np.nonzero(set_)
    n = len(row)
    return Faults(np.full(n, site, np.int64), np.full(n, item, np.int64), elements[row].astype(np.int64),
                  np.full(n, step, np.int64), bit.astype(np.int64))
