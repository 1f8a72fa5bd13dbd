"""Exact fault sampling (docs/fault_model.md) and the fault tables fed to an injection graph.

Two steps, kept apart so that logs can be replayed without re-sampling:

* ``sample_faults(plan, ber, rng)`` draws the canonical faults ``(site, item, element, step, bit)``:
  per site and per item, ``k ~ Binomial(n, ber * scale)`` and ``k`` distinct (operation, bit)
  positions uniformly out of ``n``.
* ``fault_feeds(plan, faults)`` turns canonical faults into the int64 tables and offset vectors
  that the ``ai.onnxft`` operators consume.

``SitePlan`` is a site's geometry for one batch shape, computed from the ``onnxft.shapes`` output of
a fault-free run.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .sites import Site, SiteTable


@dataclass
class SitePlan:
    site: Site
    out_shape: tuple
    items: int  # independent items (the batch), or 1 for a site whose output has no batch axis
    elements: int  # output elements per item
    per_op_bits: int  # bit positions per output element (L for gemm/conv, W for elementwise)
    k: int = 0  # reduction length (gemm/conv)
    a_shape: tuple = ()
    b_shape: tuple = ()
    conv: dict = field(default_factory=dict)
    geometry: dict | None = None  # per-shape constants of the fault tables, filled on first use

    @property
    def bits_per_item(self) -> int:
        return self.elements * self.per_op_bits

    @property
    def operations_per_item(self) -> int:
        if self.site.kind == "elementwise":
            return self.elements
        return self.elements * (2 * self.k - 1 + (1 if self.site.bias else 0))


def _split_shapes(table: SiteTable, shapes: np.ndarray) -> list[list[tuple]]:
    out, pos = [], 0
    for site in table.sites:
        per = []
        for rank in site.shape_ranks:
            per.append(tuple(int(v) for v in shapes[pos:pos + rank]))
            pos += rank
        out.append(per)
    if pos != len(shapes):
        raise ValueError(f"shapes vector has {len(shapes)} entries, the site table expects {pos}")
    return out


def _conv_pads(site: Site, x_shape, w_shape, y_shape):
    c = site.conv
    strides, dil = c["strides"], c["dilations"]
    mode = c.get("auto_pad", "NOTSET")
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for i in range(2):
            total = max((y_shape[2 + i] - 1) * strides[i] + (w_shape[2 + i] - 1) * dil[i] + 1 - x_shape[2 + i], 0)
            pads.append(total // 2 if mode == "SAME_UPPER" else total - total // 2)
        return pads
    if mode == "VALID":
        return [0, 0]
    return [c["pads"][0], c["pads"][1]]


def make_plans(table: SiteTable, shapes: np.ndarray, batch: int) -> list[SitePlan]:
    """Geometry of every site for one batch, from the ``onnxft.shapes`` output."""
    plans = []
    for site, shp in zip(table.sites, _split_shapes(table, np.asarray(shapes))):
        y = shp[0]
        total = int(np.prod(y, dtype=np.int64)) if y else 1
        items = batch if (y and batch > 0 and y[0] % batch == 0) else 1
        elements = total // items
        if site.kind == "elementwise":
            plans.append(SitePlan(site, y, items, elements, site.widths["element"]))
            continue
        wp, wa = site.widths["product"], site.widths["sum"]
        a, b = shp[1], shp[2]
        if site.kind == "conv":
            k = int(np.prod(b[1:]))
        else:
            k = a[-1]
        per = k * wp + (k - 1) * wa + (wa if site.bias else 0)
        plan = SitePlan(site, y, items, elements, per, k, a, b)
        if site.kind == "conv":
            plan.conv = dict(site.conv, pads2=_conv_pads(site, a, b, y))
        plans.append(plan)
    return plans


@dataclass
class Faults:
    """Canonical faults of one trial. One row per flipped bit; arrays are aligned."""

    site: np.ndarray  # index into the site table
    item: np.ndarray
    element: np.ndarray  # flat index within one item's output
    step: np.ndarray  # gemm/conv operation step (docs/fault_model.md); 0 for elementwise
    bit: np.ndarray

    @classmethod
    def empty(cls) -> "Faults":
        z = np.zeros(0, np.int64)
        return cls(z, z, z, z, z)

    def __len__(self) -> int:
        return len(self.site)

    @classmethod
    def concat(cls, parts: list["Faults"]) -> "Faults":
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("site", "item", "element", "step", "bit")))

    def subset(self, keep: np.ndarray) -> "Faults":
        """The faults where ``keep`` (a bool mask or an index array) selects."""
        return Faults(self.site[keep], self.item[keep], self.element[keep], self.step[keep], self.bit[keep])

    def rows(self):
        return zip(self.site.tolist(), self.item.tolist(), self.element.tolist(), self.step.tolist(), self.bit.tolist())


def sample_faults(plans: list[SitePlan], ber: float, rng: np.random.Generator) -> Faults:
    """Draw the canonical faults of one trial (sites in graph order, items in batch order).

    One Binomial draw per (site, item); the positions of an item's ``k`` flips are drawn uniformly
    with replacement and, in the rare case that two coincide, redrawn without replacement — both
    give a uniformly random set of ``k`` distinct positions, so the result is exact.
    """
    if not (0.0 <= ber <= 1.0):
        raise ValueError(f"BER must be in [0, 1], got {ber}")
    if ber == 0 or not plans:
        return Faults.empty()
    pa = _plan_arrays(plans)
    n_site, owner_site, owner_item = pa.bits_per_item, pa.owner_site, pa.owner_item
    p_site = np.minimum(ber * pa.scale, 1.0)
    counts = rng.binomial(n_site[owner_site], p_site[owner_site])
    hit = np.nonzero(counts)[0]
    if len(hit) == 0:
        return Faults.empty()
    owners = np.repeat(hit, counts[hit])
    n_owner = n_site[owner_site[owners]]
    pos = rng.integers(0, n_owner, dtype=np.int64)
    order = np.lexsort((pos, owners))
    owners, pos = owners[order], pos[order]
    dup = (owners[1:] == owners[:-1]) & (pos[1:] == pos[:-1])
    if dup.any():
        for o in np.unique(owners[1:][dup]):
            sel = owners == o
            pos[sel] = np.sort(rng.choice(int(n_site[owner_site[o]]), int(sel.sum()), replace=False))
    site = owner_site[owners]
    element, step, bit = _decode(plans, site, pos)
    return Faults(site.astype(np.int64), owner_item[owners].astype(np.int64), element, step, bit)


def _decode(plans: list[SitePlan], site: np.ndarray, pos: np.ndarray):
    """Position within one item's bits -> (element, step, bit), per docs/fault_model.md."""
    pa = _plan_arrays(plans)
    per, k, wp, wa, gemm = pa.per_op_bits[site], pa.k[site], pa.product_bits[site], pa.sum_bits[site], pa.gemm[site]
    element, r = np.divmod(pos, per)
    kp = k * wp
    in_products = r < kp
    step = np.where(in_products, r // wp, k + (r - kp) // wa)
    bit = np.where(in_products, r % wp, (r - kp) % wa)
    return element, np.where(gemm, step, 0), np.where(gemm, bit, r)


def _signed(mask: np.ndarray, width: int) -> np.ndarray:
    """Bit pattern ``mask`` of a ``width``-bit integer, as the signed value of that pattern."""
    mask = mask.astype(np.int64)
    return np.where(mask >= (1 << (width - 1)), mask - (1 << width), mask)


def _op_time(step, k: int):
    """Execution order inside one output element: p0, p1, s1, p2, s2, …, bias."""
    return np.where(step < k, np.maximum(2 * step - 1, 0), 2 * (step - k + 1))


def _op_time_int(step: int, k: int) -> int:
    return max(2 * step - 1, 0) if step < k else 2 * (step - k + 1)


def site_tables(plan: SitePlan, faults: Faults, site_index: int | None = None):
    """Fault table and offset vectors of one site. Returns (feeds dict, merged op rows).

    ``faults`` holds this site's faults (or pass ``site_index`` to select them).
    """
    if site_index is not None:
        sel = faults.site == site_index
        item, element, step, bit = faults.item[sel], faults.element[sel], faults.step[sel], faults.bit[sel]
    else:
        item, element, step, bit = faults.item, faults.element, faults.step, faults.bit
    if len(item) <= _SMALL:
        return _site_tables_small(plan, item, element, step, bit)
    site = plan.site
    names = site.input_names()
    k = plan.k
    out_index = item * plan.elements + element
    # Merge flips of the same operation into one mask; order by element, then execution order.
    op_key = out_index * (2 * k + 2) + (_op_time(step, k) if site.kind != "elementwise" else 0)
    uniq, first, inv = np.unique(op_key, return_index=True, return_inverse=True)
    masks = np.zeros(len(uniq), np.int64)
    np.bitwise_or.at(masks, inv.reshape(-1), np.left_shift(np.int64(1), bit.astype(np.int64)))
    o, t = out_index[first], step[first]
    feeds = {}
    if site.kind == "elementwise":
        width = site.widths["element"]
        m = masks if site.dtype == "uint8" else _signed(masks, width)
        feeds[names["faults"]] = np.stack([o, m], axis=1).astype(np.int64)
        return feeds, (o, t, masks)
    is_sum = t >= k
    wp, wa = site.widths["product"], site.widths["sum"]
    mask_col = masks if site.format == "int8" else np.where(is_sum, _signed(masks, wa), _signed(masks, wp))
    f = len(o)
    same = np.zeros(f, bool)
    same[1:] = o[1:] == o[:-1]
    prev = np.where(same, np.arange(f) - 1, f)
    starts = np.flatnonzero(~same)
    rank = np.arange(f) - np.repeat(starts, np.diff(np.append(starts, f)))
    column = np.where(is_sum, t + 1, t)
    if site.kind == "conv":
        a_base, b_base, channel, ih0, iw0, a_off, b_off, dh, dw = _conv_geometry(plan, o)
        extra_cols = [ih0, iw0]
        feeds[names["dh"]], feeds[names["dw"]] = dh, dw
        feeds[names["a_off"]], feeds[names["b_off"]] = a_off, b_off
        operands = [a_base, b_base]
    else:
        a_row, b_col, channel = _matmul_geometry(plan, o)
        extra_cols = []
        operands = [a_row, b_col]
    if site.format == "int8":
        extra_cols.append(np.where(is_sum, (1 << wa) - 1, (1 << wp) - 1))
    cols = operands + [o, column, is_sum, mask_col, prev, rank, channel] + extra_cols
    feeds[names["faults"]] = np.stack([np.asarray(c, np.int64) for c in cols], axis=1)
    return feeds, (o, t, masks)


_SMALL = 16  # up to this many flips at a site, plain Python beats forty tiny numpy calls


def _site_tables_small(plan: SitePlan, item, element, step, bit):
    """``site_tables`` for a few faults: the same rows in the same order, built in Python."""
    site, k = plan.site, plan.k
    names = site.input_names()
    gemm = site.kind != "elementwise"
    ops: dict[tuple, int] = {}
    for it, e, t, b in zip(item.tolist(), element.tolist(), step.tolist(), bit.tolist()):
        o = it * plan.elements + e
        key = (o, _op_time_int(t, k) if gemm else 0, t)
        ops[key] = ops.get(key, 0) | (1 << b)
    keys = sorted(ops)
    o = np.array([key[0] for key in keys], np.int64)
    t = np.array([key[2] for key in keys], np.int64)
    masks = [ops[key] for key in keys]

    def signed(m, width):
        return m - (1 << width) if m >= 1 << (width - 1) else m

    if not gemm:
        width = site.widths["element"]
        rows = [[int(oo), m if site.dtype == "uint8" else signed(m, width)] for oo, m in zip(o.tolist(), masks)]
        return {names["faults"]: np.array(rows, np.int64).reshape(-1, 2)}, (o, t, np.array(masks, np.int64))
    wp, wa = site.widths["product"], site.widths["sum"]
    cols = {c: [] for c in ("column", "is_sum", "mask", "prev", "rank", "width_mask")}
    ol = o.tolist()
    for i, (oo, tt, m) in enumerate(zip(ol, t.tolist(), masks)):
        is_sum = tt >= k
        first = i == 0 or ol[i - 1] != oo
        cols["column"].append(tt + 1 if is_sum else tt)
        cols["is_sum"].append(int(is_sum))
        cols["mask"].append(m if site.format == "int8" else signed(m, wa if is_sum else wp))
        cols["prev"].append(len(ol) if first else i - 1)
        cols["rank"].append(0 if first else cols["rank"][-1] + 1)
        cols["width_mask"].append((1 << (wa if is_sum else wp)) - 1)
    feeds = {}
    if site.kind == "conv":
        a_base, b_base, channel, ih0, iw0, a_off, b_off, dh, dw = _conv_geometry(plan, o)
        feeds.update({names["dh"]: dh, names["dw"]: dw, names["a_off"]: a_off, names["b_off"]: b_off})
        table = [a_base, b_base]
        extra = [ih0, iw0]
    else:
        a_row, b_col, channel = _matmul_geometry(plan, o)
        table = [a_row, b_col]
        extra = []
    table += [o, cols["column"], cols["is_sum"], cols["mask"], cols["prev"], cols["rank"], channel] + extra
    if site.format == "int8":
        table.append(cols["width_mask"])
    feeds[names["faults"]] = np.array([np.asarray(c, np.int64) for c in table], np.int64).T.reshape(len(ol), -1)
    return feeds, (o, t, np.array(masks, np.int64))


def _matmul_geometry(plan: SitePlan, o: np.ndarray):
    """(row of A viewed [-1, K], column index for B, output column n) of each output element.

    For a batched B the column index is the row of B^T viewed [-1, K] (BatchedGemmFaults)."""
    g = plan.geometry
    if g is None:  # per-shape constants, computed once per plan
        a, b, k = list(plan.a_shape), list(plan.b_shape), plan.k
        a2 = a if len(a) >= 2 else [1, k]
        b2 = b if len(b) >= 2 else [k, 1]
        batch = tuple(np.broadcast_shapes(tuple(a2[:-2]), tuple(b2[:-2])))
        y2 = batch + (a2[-2], b2[-1])

        def batch_rows(shape2, rows):
            # rows contributed by each y2 axis in this operand's [-1, rows-per-matrix] view
            nb, off = len(shape2) - 2, len(batch) - (len(shape2) - 2)
            out = [0] * len(y2)
            stride = rows
            for i in range(nb - 1, -1, -1):
                out[i + off] = 0 if shape2[i] == 1 else stride
                stride *= shape2[i]
            return out

        a_rows = batch_rows(a2, a2[-2])
        a_rows[-2] = 1  # + m
        b_rows = batch_rows(b2, b2[-1])
        b_rows[-1] = 1  # + n
        g = plan.geometry = {"y2": y2, "a": np.array(a_rows, np.int64), "b": np.array(b_rows, np.int64)}
    coords = np.stack(np.unravel_index(o, g["y2"]), axis=1)
    return coords @ g["a"], coords @ g["b"], coords[:, -1]


def _conv_geometry(plan: SitePlan, o: np.ndarray):
    g = plan.geometry
    _, c, h, w = plan.a_shape
    co, cg, kh, kw = plan.b_shape
    if g is None:
        dil_h, dil_w = plan.conv["dilations"]
        ci, ki, kj = np.meshgrid(np.arange(cg), np.arange(kh), np.arange(kw), indexing="ij")
        dh = (ki * dil_h).reshape(-1).astype(np.int64)
        dw = (kj * dil_w).reshape(-1).astype(np.int64)
        g = plan.geometry = {"dh": dh, "dw": dw, "a_off": (ci.reshape(-1) * h * w + dh * w + dw).astype(np.int64),
                             "b_off": np.arange(cg * kh * kw, dtype=np.int64)}
    sh, sw = plan.conv["strides"]
    pt, pl = plan.conv["pads2"]
    bn, bco, boh, bow = np.unravel_index(o, plan.out_shape)
    ih0 = boh * sh - pt
    iw0 = bow * sw - pl
    grp = bco // (co // plan.conv["group"])
    a_base = bn * (c * h * w) + grp * (cg * h * w) + ih0 * w + iw0
    return a_base, bco * (cg * kh * kw), bco, ih0, iw0, g["a_off"], g["b_off"], g["dh"], g["dw"]


def fault_feeds(plans: list[SitePlan], faults: Faults) -> dict[str, np.ndarray]:
    """All fault inputs for one trial; sites without faults are left out (they default to empty).

    The same tables as ``site_tables`` site by site, built for all sites at once: one sort and a
    few array operations over every fault of the trial, then one slice per faulted site (Python
    work per run stays well under a millisecond at thousands of faults)."""
    feeds: dict[str, np.ndarray] = {}
    if len(faults) == 0:
        return feeds
    pa = _plan_arrays(plans)
    site = faults.site.astype(np.int64, copy=False)
    gemm = pa.gemm[site]
    k = pa.k[site]
    out_index = faults.item * pa.elements[site] + faults.element
    op_time = np.where(gemm, _op_time(faults.step, k), 0)
    order = np.lexsort((op_time, out_index, site))
    site, out_index, op_time = site[order], out_index[order], op_time[order]
    step, bits = faults.step[order], np.left_shift(np.int64(1), faults.bit[order].astype(np.int64))
    # Merge flips of the same operation into one mask (rows sorted by site, element, execution order).
    new_op = np.ones(len(site), bool)
    new_op[1:] = (site[1:] != site[:-1]) | (out_index[1:] != out_index[:-1]) | (op_time[1:] != op_time[:-1])
    starts = np.flatnonzero(new_op)
    masks = np.bitwise_or.reduceat(bits, starts)
    site, o, t = site[starts], out_index[starts], step[starts]
    n = len(site)
    seg = np.flatnonzero(np.r_[True, site[1:] != site[:-1]])  # first row of each faulted site
    seg_end = np.r_[seg[1:], n]
    seg_sites = site[seg]
    if not pa.gemm[seg_sites].all():  # elementwise tables: (index, mask)
        width = pa.element_bits[site]
        m = np.where(pa.unsigned[site], masks, _signed_rows(masks, width))
        table = np.stack([o, m], axis=1)
        for a, b, idx in zip(seg.tolist(), seg_end.tolist(), seg_sites.tolist()):
            if not pa.gemm[idx]:
                feeds[pa.fault_names[idx]] = table[a:b]
    gemm_segs = [(a, b, idx) for a, b, idx in zip(seg.tolist(), seg_end.tolist(), seg_sites.tolist())
                 if pa.gemm[idx]]
    if not gemm_segs:
        return feeds
    k = pa.k[site]
    is_sum = t >= k
    width = np.where(is_sum, pa.sum_bits[site], pa.product_bits[site])
    mask_col = np.where(pa.int8[site], masks, _signed_rows(masks, width))
    same = np.zeros(n, bool)
    same[1:] = (site[1:] == site[:-1]) & (o[1:] == o[:-1])
    first_row = np.repeat(seg, seg_end - seg)  # each row's site start
    local = np.arange(n) - first_row
    prev = np.where(same, local - 1, np.repeat(seg_end - seg, seg_end - seg))
    chain_start = np.flatnonzero(~same)
    rank = np.arange(n) - np.repeat(chain_start, np.diff(np.r_[chain_start, n]))
    column = np.where(is_sum, t + 1, t)
    width_mask = (np.int64(1) << width) - 1
    a_row, b_col, channel = _matmul_rows(pa, site, o)
    table = np.stack([a_row, b_col, o, column, is_sum, mask_col, prev, rank, channel, width_mask], axis=1)
    for a, b, idx in gemm_segs:
        plan = plans[idx]
        if plan.site.kind == "conv":
            a_base, b_base, ch, ih0, iw0, a_off, b_off, dh, dw = _conv_geometry(plan, o[a:b])
            cols = [a_base, b_base, o[a:b], column[a:b], is_sum[a:b], mask_col[a:b], prev[a:b], rank[a:b], ch,
                    ih0, iw0] + ([width_mask[a:b]] if pa.int8[idx] else [])
            names = plan.site.input_names()
            feeds[names["faults"]] = np.stack([np.asarray(c, np.int64) for c in cols], axis=1)
            feeds[names["dh"]], feeds[names["dw"]] = dh, dw
            feeds[names["a_off"]], feeds[names["b_off"]] = a_off, b_off
        else:
            feeds[pa.fault_names[idx]] = table[a:b] if pa.int8[idx] else np.ascontiguousarray(table[a:b, :9])
    return feeds


def _signed_rows(mask: np.ndarray, width: np.ndarray) -> np.ndarray:
    """``_signed`` with a width per row."""
    return np.where(mask >= (np.int64(1) << (width - 1)), mask - (np.int64(1) << width), mask)


@dataclass
class _PlanArrays:
    """Per-site constants of a plan list as arrays (indexed by site), for the vectorised paths."""

    plans: list  # kept so that the cache key (object ids) stays valid
    gemm: np.ndarray  # matrix product (gemm) or convolution
    k: np.ndarray
    elements: np.ndarray
    element_bits: np.ndarray
    unsigned: np.ndarray
    product_bits: np.ndarray
    sum_bits: np.ndarray
    int8: np.ndarray
    fault_names: list
    per_op_bits: np.ndarray
    bits_per_item: np.ndarray
    scale: np.ndarray
    owner_site: np.ndarray  # (site, item) pairs of one trial, sites in graph order
    owner_item: np.ndarray
    mm_dims: np.ndarray  # [sites, R] matmul output dims (y2, left-padded with 1)
    mm_a: np.ndarray  # [sites, R] rows of A per unit of each output coordinate
    mm_b: np.ndarray


_PLAN_CACHE: dict = {}


def _plan_arrays(plans: list[SitePlan]) -> _PlanArrays:
    key = tuple(map(id, plans))
    hit = _PLAN_CACHE.get(key)
    if hit is not None:
        return hit
    n = len(plans)
    mm = [p for p in plans if p.site.kind == "gemm"]
    for p in mm:
        _matmul_geometry(p, np.zeros(0, np.int64))  # fills p.geometry
    rank = max([len(p.geometry["y2"]) for p in mm], default=1)
    dims, ga, gb = np.ones((n, rank), np.int64), np.zeros((n, rank), np.int64), np.zeros((n, rank), np.int64)
    for i, p in enumerate(plans):
        if p.site.kind == "gemm":
            g = p.geometry
            r = len(g["y2"])
            dims[i, rank - r:], ga[i, rank - r:], gb[i, rank - r:] = g["y2"], g["a"], g["b"]
    widths = [p.site.widths for p in plans]
    pa = _PlanArrays(
        plans=list(plans),
        gemm=np.array([p.site.kind != "elementwise" for p in plans], bool),
        k=np.array([p.k for p in plans], np.int64),
        elements=np.array([p.elements for p in plans], np.int64),
        element_bits=np.array([w.get("element", 32) for w in widths], np.int64),
        unsigned=np.array([p.site.dtype == "uint8" for p in plans], bool),
        product_bits=np.array([w.get("product", 32) for w in widths], np.int64),
        sum_bits=np.array([w.get("sum", 32) for w in widths], np.int64),
        int8=np.array([p.site.format == "int8" for p in plans], bool),
        fault_names=[p.site.input_names()["faults"] for p in plans],
        per_op_bits=np.array([p.per_op_bits for p in plans], np.int64),
        bits_per_item=np.array([p.bits_per_item for p in plans], np.int64),
        scale=np.array([p.site.scale for p in plans], np.float64),
        owner_site=np.repeat(np.arange(n), [p.items for p in plans]),
        owner_item=np.concatenate([np.arange(p.items) for p in plans]) if n else np.zeros(0, np.int64),
        mm_dims=dims, mm_a=ga, mm_b=gb)
    if len(_PLAN_CACHE) >= 8:
        _PLAN_CACHE.pop(next(iter(_PLAN_CACHE)))
    _PLAN_CACHE[key] = pa
    return pa


def _matmul_rows(pa: _PlanArrays, site: np.ndarray, o: np.ndarray):
    """``_matmul_geometry`` for rows of many sites at once (conv rows get meaningless values)."""
    dims, ga, gb = pa.mm_dims[site], pa.mm_a[site], pa.mm_b[site]
    rem = o.copy()
    a_row = np.zeros_like(o)
    b_col = np.zeros_like(o)
    channel = None
    for r in range(dims.shape[1] - 1, -1, -1):
        coord = rem % dims[:, r]
        rem //= dims[:, r]
        a_row += coord * ga[:, r]
        b_col += coord * gb[:, r]
        if channel is None:
            channel = coord
    return a_row, b_col, channel


def sample_exact_faults(plans: list[SitePlan], k: int, rng: np.random.Generator) -> Faults:
    """Exactly ``k`` faults in every item: ``k`` distinct (operation, bit) positions drawn uniformly
    out of all the positions of one item, over every site (sites with BER scale 0 excluded).

    This is the operation-wise model of ``sample_faults`` conditioned on the number of flips in one
    inference being ``k``: with every bit an independent Bernoulli(BER) trial, given ``K = k`` the
    set of flipped positions is uniform over the ``k``-subsets (docs/resiliency_accuracy.md). Scales
    other than 0 and 1 make the conditional law non-uniform and are refused.

    Positions are drawn with replacement per item and the item's draw repeated while two coincide
    (rejection), which leaves a uniformly random ``k``-subset."""
    if k < 0:
        raise ValueError(f"the number of faults must be at least 0, got {k}")
    if k == 0 or not plans:
        return Faults.empty()
    pa = _plan_arrays(plans)
    if np.any((pa.scale != 0) & (pa.scale != 1)):
        raise ValueError("exactly-k sampling needs BER scales of 0 or 1 (the conditional law is not uniform otherwise)")
    items = max(p.items for p in plans)
    live = np.flatnonzero(pa.scale > 0)
    shared = [plans[i].site.id for i in live if plans[i].items != items]
    if items > 1 and shared:
        raise ValueError(f"site {shared[0]} has no batch axis, so its faults would be shared by every item: "
                         "use batch 1")
    bits = pa.bits_per_item[live]
    ends = np.cumsum(bits)
    total = int(ends[-1]) if len(ends) else 0
    if k > total:
        raise ValueError(f"{k} faults asked for, one item has only {total} bit positions")
    pos = rng.integers(0, total, size=(items, k), dtype=np.int64)
    for i in range(items):
        while len(np.unique(pos[i])) < k:
            pos[i] = rng.integers(0, total, size=k, dtype=np.int64)
    flat = pos.reshape(-1)
    which = np.searchsorted(ends, flat, side="right")
    site = live[which]
    local = flat - (ends[which] - bits[which])
    element, step, bit = _decode(plans, site, local)
    item = np.repeat(np.arange(items, dtype=np.int64), k)
    return Faults(site.astype(np.int64), item, element, step, bit)
