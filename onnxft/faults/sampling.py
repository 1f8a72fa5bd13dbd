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

from dataclasses import dataclass, field, replace

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
    # A site inside If/Loop/Scan: one plan per execution in this run (empty: it did not run).
    executions: list | None = None

    @property
    def bits_per_item(self) -> int:
        if self.executions is not None:
            return sum(p.bits_per_item for p in self.executions)
        return self.elements * self.per_op_bits

    @property
    def operations_per_item(self) -> int:
        if self.executions is not None:
            return sum(p.operations_per_item for p in self.executions)
        if self.site.kind == "elementwise":
            return self.elements
        return self.elements * (2 * self.k - 1 + (1 if self.site.bias else 0))


def _split_shapes(table: SiteTable, shapes: np.ndarray) -> list[list[tuple]]:
    out, pos = [], 0
    for site in table.sites:
        per = []
        if site.path:  # control flow: shapes come per execution (make_plans)
            out.append(per)
            continue
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


def _begin_pads(site: Site, x_shape, w_shape, y_shape) -> list[int]:
    """Padding before each spatial axis of a gathered convolution (auto_pad resolved as ONNX
    Conv does: SAME_UPPER puts the odd pixel at the end)."""
    c = site.conv
    d = len(x_shape) - 2
    mode = c.get("auto_pad", "NOTSET")
    if mode == "VALID":
        return [0] * d
    if mode in ("SAME_UPPER", "SAME_LOWER") and not c.get("transpose"):
        out = []
        for i in range(d):
            total = max((y_shape[2 + i] - 1) * c["strides"][i] + (w_shape[2 + i] - 1) * c["dilations"][i] + 1
                        - x_shape[2 + i], 0)
            out.append(total // 2 if mode == "SAME_UPPER" else total - total // 2)
        return out
    return [int(p) for p in c["pads"][:d]]


def _plan(site: Site, shp: list[tuple], batch: int) -> SitePlan:
    """Geometry of one site (or one execution of a control-flow site) from its shapes."""
    y = shp[0]
    total = int(np.prod(y, dtype=np.int64)) if y else 1
    items = batch if (y and batch > 0 and y[0] % batch == 0) else 1
    elements = total // items
    if site.kind == "elementwise":
        return SitePlan(site, y, items, elements, site.widths["element"])
    wp, wa = site.widths["product"], site.widths["sum"]
    a, b = shp[1], shp[2]
    if site.kind == "conv":
        k = conv_reduction_length(site, a, b)
    else:
        k = a[-1]
    per = k * wp + (k - 1) * wa + (wa if site.bias else 0)
    plan = SitePlan(site, y, items, elements, per, k, a, b)
    if site.gathered:
        plan.conv = dict(site.conv, begin=_begin_pads(site, a, b, y))
    elif site.kind == "conv":
        plan.conv = dict(site.conv, pads2=_conv_pads(site, a, b, y))
    return plan
def _execution_plans(site: Site, rows: np.ndarray, batch: int) -> SitePlan:
    """The plan of a control-flow site: one plan per execution (row of its executions output),
    each sampled like a site of its own; the site's own numbers are their sums."""
    rows = np.asarray(rows, np.int64).reshape(-1, 1 + sum(site.shape_ranks))
    per = []
    for e, row in enumerate(rows):
        shp, pos = [], 1
        for rank in site.shape_ranks:
            shp.append(tuple(int(v) for v in row[pos:pos + rank]))
            pos += rank
        per.append(_plan(replace(site, id=f"{site.id}@{e}", path=""), shp, batch))
    first = per[0] if per else SitePlan(site, (), 1, 0, 0)
    return SitePlan(site, first.out_shape, first.items, first.elements, first.per_op_bits, first.k,
                    first.a_shape, first.b_shape, dict(first.conv), executions=per)


def make_plans(table: SiteTable, shapes: np.ndarray, batch: int,
               executions: dict[str, np.ndarray] | None = None) -> list[SitePlan]:
    """Geometry of every site for one batch, from the ``onnxft.shapes`` output (and, for sites
    inside If/Loop/Scan, their ``onnxft.<site>.executions`` outputs)."""
    plans = []
    for site, shp in zip(table.sites, _split_shapes(table, np.asarray(shapes))):
        if site.path:
            if executions is None or site.executions_output() not in executions:
                raise ValueError(f"site {site.id} ({site.node}) is inside control flow: "
                                 f"its executions output {site.executions_output()} is needed")
            plans.append(_execution_plans(site, executions[site.executions_output()], batch))
        else:
            plans.append(_plan(site, shp, batch))
    return plans


@dataclass
class Faults:
    """Canonical faults of one trial. One row per flipped bit; arrays are aligned."""

    site: np.ndarray  # index into the site table
    item: np.ndarray
    element: np.ndarray  # flat index within one item's output
    step: np.ndarray  # gemm/conv operation step (docs/fault_model.md); 0 for elementwise
    bit: np.ndarray
    # Which execution of a control-flow site (its order among the site's executions in the run);
    # 0 for sites outside control flow.
    execution: np.ndarray | None = None

    def __post_init__(self):
        if self.execution is None:
            self.execution = np.zeros(len(self.site), np.int64)

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
        return cls(*(np.concatenate([getattr(p, f) for p in parts])
                     for f in ("site", "item", "element", "step", "bit", "execution")))

    def subset(self, keep: np.ndarray) -> "Faults":
        """The faults where ``keep`` (a bool mask or an index array) selects."""
        return Faults(self.site[keep], self.item[keep], self.element[keep], self.step[keep], self.bit[keep],
                      self.execution[keep])

    def rows(self):
        return zip(self.site.tolist(), self.item.tolist(), self.element.tolist(), self.step.tolist(), self.bit.tolist())


# Memory budget of one batch's faults (``--max-faults``): sampling and the fault tables of one
# batch take about BYTES_PER_FLIP bytes per flip at their peak (measured, docs/fault_model.md), and
# a flip in a GEMM/Conv product or partial sum also recomputes that output element's K products and
# running sums (operand gathers, products, sums, indices: about BYTES_PER_PRODUCT bytes each), one
# site at a time. The budget is in plain flips' worth: the default keeps a batch under about 6 GiB.
DEFAULT_MAX_FAULTS = 10_000_000
BYTES_PER_FLIP = 600
BYTES_PER_PRODUCT = 24


class FaultBudgetError(ValueError):
    """The expected number of flips of one batch exceeds ``max_faults``."""


def expected_faults(plans: list[SitePlan], ber: float) -> float:
    """Expected flips of one batch at ``ber``: sum over sites of bits x items x BER x scale
    (the mean of the Binomial counts that ``sample_faults`` draws)."""
    return float(sum(min(ber * p.site.scale, 1.0) * p.bits_per_item * p.items for p in plans))


def expected_fault_bytes(plans: list[SitePlan], ber: float) -> float:
    """Expected peak memory of one batch's faults at ``ber``: BYTES_PER_FLIP per flip (every site's
    tables exist at once), plus the largest site's recompute, BYTES_PER_PRODUCT per product its
    flips recompute (K each; sites apply their faults one after another)."""
    flips = [min(ber * p.site.scale, 1.0) * p.bits_per_item * p.items for p in plans]
    recompute = max((f * p.k for f, p in zip(flips, plans)), default=0.0)
    return float(sum(flips) * BYTES_PER_FLIP + recompute * BYTES_PER_PRODUCT)


def check_fault_budget(plans: list[SitePlan], ber: float, max_faults: float | None = DEFAULT_MAX_FAULTS) -> float:
    """Refuse (FaultBudgetError, one line) a BER whose faults of one batch would take more memory
    than ``max_faults`` plain flips (``max_faults x BYTES_PER_FLIP`` bytes; None: no limit), before
    anything is drawn; returns the expected number of flips."""
    n = expected_faults(plans, ber)
    if max_faults is not None:
        need = expected_fault_bytes(plans, ber)
        if need > max_faults * BYTES_PER_FLIP:
            batch = max((p.items for p in plans), default=1)
            raise FaultBudgetError(
                f"BER {ber:g} means {n:.3g} flips per batch of {batch} (about {_gib(need)} with the products a "
                f"GEMM/Conv flip recomputes), over the limit of {max_faults:.3g} flips' worth "
                f"({_gib(max_faults * BYTES_PER_FLIP)}, --max-faults): lower the BER or --batch, or raise --max-faults")
    return n


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.3g} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.3g} MiB"


def sample_faults(plans: list[SitePlan], ber: float, rng: np.random.Generator,
                  max_faults: float | None = DEFAULT_MAX_FAULTS) -> Faults:
    """Draw the canonical faults of one trial (sites in graph order, items in batch order).

    A site inside control flow is sampled per execution: each execution is a site of its own
    (``SitePlan.executions``), so its flips are Binomial(operations of that execution x bits, BER).
    """
    flat = _flat_plans(plans)
    if flat is None:
        return _sample_faults(plans, ber, rng, max_faults)
    f = _sample_faults(flat.plans, ber, rng, max_faults)
    return Faults(flat.owner[f.site], f.item, f.element, f.step, f.bit, flat.execution[f.site])


def _sample_faults(plans: list[SitePlan], ber: float, rng: np.random.Generator,
                   max_faults: float | None = DEFAULT_MAX_FAULTS) -> Faults:
    """``sample_faults`` over plans that are all plain sites.

    One Binomial draw per (site, item); the positions of an item's ``k`` flips are drawn uniformly
    with replacement and, in the rare case that two coincide, redrawn without replacement — both
    give a uniformly random set of ``k`` distinct positions, so the result is exact. A BER whose
    expected flips exceed ``max_faults`` is refused before anything is drawn (``check_fault_budget``).
    """
    if not (0.0 <= ber <= 1.0):
        raise ValueError(f"BER must be in [0, 1], got {ber}")
    if ber == 0 or not plans:
        return Faults.empty()
    check_fault_budget(plans, ber, max_faults)
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
    if site.gathered:
        channel, feeds[names["a_index"]], feeds[names["b_index"]] = _gather_geometry(plan, o)
        extra_cols = []
        operands = []
    elif site.kind == "conv":
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
    if site.gathered:
        channel, feeds[names["a_index"]], feeds[names["b_index"]] = _gather_geometry(plan, o)
        table, extra = [], []
    elif site.kind == "conv":
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


def transpose_phase_taps(kernel: int, stride: int, dilation: int) -> np.ndarray:
    """[stride, n] kernel taps of one ConvTranspose axis by output phase: row ``r`` lists, in
    increasing order, the taps ``t`` with ``t * dilation = r (mod stride)`` (those that meet an
    input position at an output position ``o`` with ``o + pad_begin = r (mod stride)``), padded
    with -1 to the longest row (a missing tap is a zero product)."""
    rows = [[t for t in range(kernel) if (t * dilation) % stride == r] for r in range(stride)]
    n = max(1, max(len(r) for r in rows))
    return np.array([r + [-1] * (n - len(r)) for r in rows], np.int64).reshape(stride, n)


def conv_reduction_length(site: Site, x_shape, w_shape) -> int:
    """K of a Conv or ConvTranspose site (docs/fault_model.md, "Convolutions")."""
    if not site.conv.get("transpose"):
        return int(np.prod(w_shape[1:]))
    c = site.conv
    taps = [transpose_phase_taps(k, s, d).shape[1] for k, s, d in zip(w_shape[2:], c["strides"], c["dilations"])]
    return x_shape[1] // c["group"] * int(np.prod(taps))


def _axis_tables(out: int, size: int, kernel: int, stride: int, dilation: int, pad: int, transpose: bool):
    """One spatial axis of a gathered convolution, for every output position and tap slot:
    (input position, valid, kernel tap) as [out, slots] arrays."""
    o = np.arange(out, dtype=np.int64)[:, None]
    if transpose:  # the taps of o's phase; input i = (o + pad - t*dilation) / stride
        taps = transpose_phase_taps(kernel, stride, dilation)[(o[:, 0] + pad) % stride]  # [out, n]
        pos = (o + pad - np.maximum(taps, 0) * dilation) // stride
        valid = (taps >= 0) & (pos >= 0) & (pos < size)
    else:
        taps = np.broadcast_to(np.arange(kernel, dtype=np.int64), (out, kernel))
        pos = o * stride - pad + taps * dilation
        valid = (pos >= 0) & (pos < size)
    return pos, valid, np.maximum(taps, 0)


def _gather_geometry(plan: SitePlan, o: np.ndarray):
    """(channel, a_index, b_index [F, K]) of output elements ``o`` of a gathered convolution
    (docs/fault_model.md, "Convolutions"): reduction index (c, tap slot) row-major; a_index is
    -1 where the operand is a zero (padding, or a missing tap of a ConvTranspose phase).

    The spatial part ([F, slots]) comes from small per-axis tables; only the final indices are
    [F, K] (K = C_in/group x slots)."""
    x, w, y = plan.a_shape, plan.b_shape, plan.out_shape
    c = plan.conv
    d, group, transpose = len(x) - 2, c["group"], bool(c.get("transpose"))
    g = plan.geometry
    if g is None:
        kernel = tuple(w[2:])
        axes = [_axis_tables(y[2 + i], x[2 + i], kernel[i], c["strides"][i], c["dilations"][i], c["begin"][i],
                             transpose) for i in range(d)]
        slots = tuple(a[0].shape[1] for a in axes)
        g = plan.geometry = {
            "cg": x[1] // group, "mg": y[1] // group, "ks": int(np.prod(kernel)), "axes": axes,
            "slot": np.indices(slots).reshape(d, -1),  # [D, S] row-major over the slots
            "in_strides": [int(np.prod(x[3 + i:])) for i in range(d)],
            "k_strides": [int(np.prod(kernel[i + 1:])) for i in range(d)],
        }
    o = np.asarray(o, np.int64)
    coords = np.unravel_index(o, y)
    n, m = coords[0], coords[1]
    lin = tap = valid = None
    for i, (pos, ok, taps) in enumerate(g["axes"]):
        rows, cols = coords[2 + i][:, None], g["slot"][i][None, :]
        part, ok_i, tap_i = pos[rows, cols] * g["in_strides"][i], ok[rows, cols], taps[rows, cols] * g["k_strides"][i]
        lin, valid, tap = (part, ok_i, tap_i) if lin is None else (lin + part, valid & ok_i, tap + tap_i)
    cg, mg, ks = g["cg"], g["mg"], g["ks"]
    ci = np.arange(cg, dtype=np.int64)[None, :, None]
    spatial = int(np.prod(x[2:]))
    grp = m // mg
    a_index = ((n * x[1] + grp * cg) * spatial)[:, None, None] + ci * spatial + lin[:, None, :]  # [F, cg, S]
    a_index = np.where(valid[:, None, :], a_index, -1).reshape(len(o), -1)
    if transpose:  # W [C_in, M/group, kernel...]
        b_row, c_step = (grp * cg * mg + (m - grp * mg)) * ks, mg * ks
    else:  # W [M, C_in/group, kernel...]
        b_row, c_step = m * cg * ks, ks
    b_index = (b_row[:, None, None] + ci * c_step + tap[:, None, :]).reshape(len(o), -1)
    return m.astype(np.int64), a_index, b_index


def fault_feeds(plans: list[SitePlan], faults: Faults) -> dict[str, np.ndarray]:
    """All fault inputs for one trial; sites without faults are left out (they default to empty).

    A control-flow site's table stacks the tables of its executions (each built as for a plain
    site) with the execution as the last column; its body keeps the rows of the running execution.
    """
    flat = _flat_plans(plans)
    if flat is None:
        return _fault_feeds(plans, faults)
    bad = np.nonzero(faults.execution >= flat.count[faults.site])[0]
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"fault on execution {int(faults.execution[i])} of site {plans[int(faults.site[i])].site.id}, "
                         f"which ran {int(flat.count[faults.site[i]])} times")
    index = flat.start[faults.site] + faults.execution
    feeds = _fault_feeds(flat.plans, Faults(index, faults.item, faults.element, faults.step, faults.bit))
    for plan in plans:
        if plan.executions is None:
            continue
        names = plan.site.input_names()
        parts = []
        for e, ep in enumerate(plan.executions):
            own = ep.site.input_names()
            table = feeds.pop(own["faults"], None)
            if table is None:
                continue
            parts.append(np.concatenate([table, np.full((len(table), 1), e, np.int64)], axis=1))
            for key in own:  # conv offset vectors: one set for every execution
                if key == "faults":
                    continue
                vec = feeds.pop(own[key])
                if names[key] in feeds and not np.array_equal(feeds[names[key]], vec):
                    raise ValueError(f"conv site {plan.site.id} inside a loop changes shape between executions "
                                     "with faults; that is not supported")
                feeds[names[key]] = vec
        if parts:
            feeds[names["faults"]] = np.concatenate(parts, axis=0)
    return feeds


@dataclass
class _FlatPlans:
    """Plans with every control-flow site expanded into one plan per execution."""

    parents: list  # the plans given, kept so that the cache key (object ids) stays valid
    plans: list  # the expanded plans
    owner: np.ndarray  # expanded index -> site index
    execution: np.ndarray  # expanded index -> execution
    start: np.ndarray  # site index -> first expanded index
    count: np.ndarray  # site index -> executions (1 for a plain site)


_FLAT_CACHE: dict = {}


def _flat_plans(plans: list[SitePlan]) -> _FlatPlans | None:
    """None when no site is inside control flow (the common case costs one scan)."""
    if all(p.executions is None for p in plans):
        return None
    key = tuple(map(id, plans))
    hit = _FLAT_CACHE.get(key)
    if hit is not None:
        return hit
    flat, owner, execution, start, count = [], [], [], [], []
    for i, p in enumerate(plans):
        per = p.executions if p.executions is not None else [p]
        # the site's BER scale rules its executions (vuln overrides it on the site's plan)
        per = [e if e.site.scale == p.site.scale else replace(e, site=replace(e.site, scale=p.site.scale)) for e in per]
        start.append(len(flat))
        count.append(len(per))
        flat.extend(per)
        owner.extend([i] * len(per))
        execution.extend(range(len(per)))
    hit = _FlatPlans(list(plans), flat, np.array(owner, np.int64), np.array(execution, np.int64),
                     np.array(start, np.int64), np.array(count, np.int64))
    if len(_FLAT_CACHE) >= 8:
        _FLAT_CACHE.pop(next(iter(_FLAT_CACHE)))
    _FLAT_CACHE[key] = hit
    return hit


def _fault_feeds(plans: list[SitePlan], faults: Faults) -> dict[str, np.ndarray]:
    """``fault_feeds`` over plans that are all plain sites.

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
        if plan.site.gathered:
            ch, a_index, b_index = _gather_geometry(plan, o[a:b])
            cols = [o[a:b], column[a:b], is_sum[a:b], mask_col[a:b], prev[a:b], rank[a:b], ch] + (
                [width_mask[a:b]] if pa.int8[idx] else [])
            names = plan.site.input_names()
            feeds[names["faults"]] = np.stack([np.asarray(c, np.int64) for c in cols], axis=1)
            feeds[names["a_index"]], feeds[names["b_index"]] = a_index, b_index
        elif plan.site.kind == "conv":
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
