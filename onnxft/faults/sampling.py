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

    def rows(self):
        return zip(self.site.tolist(), self.item.tolist(), self.element.tolist(), self.step.tolist(), self.bit.tolist())


def sample_faults(plans: list[SitePlan], ber: float, rng: np.random.Generator) -> Faults:
    """Draw the canonical faults of one trial (sites in graph order, items in batch order)."""
    if not (0.0 <= ber <= 1.0):
        raise ValueError(f"BER must be in [0, 1], got {ber}")
    parts = []
    for idx, plan in enumerate(plans):
        p = ber * plan.site.scale
        n = plan.bits_per_item
        if p <= 0 or n == 0:
            continue
        counts = rng.binomial(n, min(p, 1.0), size=plan.items)
        for item in np.nonzero(counts)[0]:
            pos = rng.choice(n, int(counts[item]), replace=False).astype(np.int64)
            element, step, bit = _decode(plan, pos)
            m = len(pos)
            parts.append(Faults(np.full(m, idx, np.int64), np.full(m, item, np.int64), element, step, bit))
    return Faults.concat(parts)


def _decode(plan: SitePlan, pos: np.ndarray):
    element, r = np.divmod(pos, plan.per_op_bits)
    if plan.site.kind == "elementwise":
        return element, np.zeros_like(element), r
    wp, wa = plan.site.widths["product"], plan.site.widths["sum"]
    kp = plan.k * wp
    in_products = r < kp
    step = np.where(in_products, r // wp, plan.k + (r - kp) // wa)
    bit = np.where(in_products, r % wp, (r - kp) % wa)
    return element, step, bit


def _signed(mask: np.ndarray, width: int) -> np.ndarray:
    """Bit pattern ``mask`` of a ``width``-bit integer, as the signed value of that pattern."""
    mask = mask.astype(np.int64)
    return np.where(mask >= (1 << (width - 1)), mask - (1 << width), mask)


def _op_time(step: np.ndarray, k: int) -> np.ndarray:
    """Execution order inside one output element: p0, p1, s1, p2, s2, …, bias."""
    return np.where(step < k, np.maximum(2 * step - 1, 0), 2 * (step - k + 1))


def site_tables(plan: SitePlan, faults: Faults, site_index: int):
    """Fault table and offset vectors of one site. Returns (feeds dict, merged op rows)."""
    sel = faults.site == site_index
    item, element, step, bit = faults.item[sel], faults.element[sel], faults.step[sel], faults.bit[sel]
    site = plan.site
    names = site.input_names()
    out_index = item * plan.elements + element
    # Merge flips of the same operation into one mask.
    key = np.stack([out_index, step], axis=1)
    uniq, inv = np.unique(key, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    masks = np.zeros(len(uniq), np.int64)
    np.bitwise_or.at(masks, inv, np.left_shift(np.int64(1), bit.astype(np.int64)))
    o, t = uniq[:, 0], uniq[:, 1]
    feeds = {}
    if site.kind == "elementwise":
        width = site.widths["element"]
        m = masks if site.dtype == "uint8" else _signed(masks, width)
        feeds[names["faults"]] = np.stack([o, m], axis=1).astype(np.int64)
        return feeds, (o, t, masks)
    k = plan.k
    is_sum = t >= k
    wp, wa = site.widths["product"], site.widths["sum"]
    if site.format == "int8":
        mask_col = masks
    else:
        mask_col = np.where(is_sum, _signed(masks, wa), _signed(masks, wp))
    # Order by output element, then execution order; chain faults of the same element.
    order = np.lexsort((_op_time(t, k), o))
    o, t, masks, is_sum, mask_col = o[order], t[order], masks[order], is_sum[order], mask_col[order]
    f = len(o)
    same = np.zeros(f, bool)
    same[1:] = o[1:] == o[:-1]
    prev = np.where(same, np.arange(f) - 1, f)
    rank = np.zeros(f, np.int64)
    for i in range(1, f):  # faults per element are few; this loop is over faults, not elements
        if same[i]:
            rank[i] = rank[i - 1] + 1
    column = np.where(is_sum, t + 1, t)
    if site.kind == "conv":
        a_base, b_base, channel, ih0, iw0, a_off, b_off, dh, dw = _conv_geometry(plan, o)
        extra_cols = [ih0, iw0]
        feeds[names["dh"]], feeds[names["dw"]] = dh, dw
    else:
        a_base, b_base, channel, a_off, b_off = _matmul_geometry(plan, o)
        extra_cols = []
    if site.format == "int8":
        extra_cols.append(np.where(is_sum, (1 << wa) - 1, (1 << wp) - 1))
    cols = [a_base, b_base, o, column, is_sum.astype(np.int64), mask_col, prev, rank, channel] + extra_cols
    feeds[names["faults"]] = np.stack([np.asarray(c, np.int64) for c in cols], axis=1)
    feeds[names["a_off"]], feeds[names["b_off"]] = a_off, b_off
    return feeds, (o, t, masks)


def _matmul_geometry(plan: SitePlan, o: np.ndarray):
    a, b, k = list(plan.a_shape), list(plan.b_shape), plan.k
    a2 = a if len(a) >= 2 else [1, k]
    b2 = b if len(b) >= 2 else [k, 1]
    n = b2[-1]
    m = a2[-2]
    batch = np.broadcast_shapes(tuple(a2[:-2]), tuple(b2[:-2]))
    y2 = tuple(batch) + (m, n)
    idx = np.unravel_index(o, y2)
    bidx = idx[:-2]

    def base(shape2, row, col):
        nb = len(shape2) - 2
        off = len(batch) - nb
        flat = np.zeros_like(o)
        stride = 1
        full = [row, col]
        # strides of shape2, walking from the last axis
        coords = [np.zeros_like(o) if shape2[i] == 1 else bidx[i + off] for i in range(nb)] + full
        for axis in range(len(shape2) - 1, -1, -1):
            flat = flat + coords[axis] * stride
            stride *= shape2[axis]
        return flat

    a_base = base(a2, idx[-2], np.zeros_like(o))
    b_base = base(b2, np.zeros_like(o), idx[-1])
    a_off = np.arange(k, dtype=np.int64)
    b_off = np.arange(k, dtype=np.int64) * n
    return a_base, b_base, idx[-1], a_off, b_off


def _conv_geometry(plan: SitePlan, o: np.ndarray):
    n_, c, h, w = plan.a_shape
    co, cg, kh, kw = plan.b_shape
    _, _, oh, ow = plan.out_shape
    c_ = plan.conv
    sh, sw = c_["strides"]
    dil_h, dil_w = c_["dilations"]
    pt, pl = c_["pads2"]
    group = c_["group"]
    bn, bco, boh, bow = np.unravel_index(o, (plan.out_shape[0], co, oh, ow))
    grp = bco // (co // group)
    ih0 = boh * sh - pt
    iw0 = bow * sw - pl
    a_base = bn * c * h * w + grp * cg * h * w + ih0 * w + iw0
    ci, ki, kj = np.meshgrid(np.arange(cg), np.arange(kh), np.arange(kw), indexing="ij")
    dh = (ki * dil_h).reshape(-1).astype(np.int64)
    dw = (kj * dil_w).reshape(-1).astype(np.int64)
    a_off = (ci.reshape(-1) * h * w + dh * w + dw).astype(np.int64)
    k = cg * kh * kw
    b_base = bco * k
    b_off = np.arange(k, dtype=np.int64)
    return a_base, b_base, bco, ih0, iw0, a_off, b_off, dh, dw


def fault_feeds(plans: list[SitePlan], faults: Faults) -> dict[str, np.ndarray]:
    """All fault inputs for one trial; sites without faults are left out (they default to empty)."""
    feeds: dict[str, np.ndarray] = {}
    for idx in np.unique(faults.site):
        f, _ = site_tables(plans[int(idx)], faults, int(idx))
        feeds.update(f)
    return feeds
