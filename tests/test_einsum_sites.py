"""Einsum in batched-matmul form is a GEMM site: decompose rewrites it into Transpose/Reshape +
MatMul (bit-equal to onnxruntime's Einsum fault-free), its MatMul is faulted like any other and
matches the dense reference to the bit; other equations are non-sites with the reason."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h

import reference as R
from onnxft.passes.decompose import decompose, einsum_as_matmul
from onnxft.passes.inject import prepare
from test_inject_reference import (assert_bits_equal, assert_close, build, check_ber0, hand, make_model,
                                   merge, plain_run, sampled, vi)

EQUATIONS = {
    "bhid,bhjd->bhij": ((2, 3, 4, 5), (2, 3, 6, 5)),   # Q K^T
    "bhij,bhjd->bhid": ((2, 3, 4, 6), (2, 3, 6, 5)),   # attention x V
    "bid,de->bie": ((2, 4, 5), (5, 3)),                # projection
    "bqd,bkd->bqk": ((2, 3, 4), (2, 5, 4)),
    "bhqd,bkhd->bhqk": ((2, 3, 4, 5), (2, 6, 3, 5)),   # transposed key layout
    "abc,cd->dab": ((2, 3, 4), (4, 5)),                # permuted output
    "abcd,cdef->abef": ((2, 3, 4, 5), (4, 5, 2, 3)),   # two summed letters
    "nc,mc->nm": ((3, 4), (5, 4)),
    "i,j->ij": ((3,), (4,)),                            # outer product (K = 1)
}


def _model(eq, sa, sb):
    return make_model([h.make_node("Einsum", ["a", "b"], ["y"], equation=eq, name="einsum")],
                      [vi("a", T.FLOAT, list(sa)), vi("b", T.FLOAT, list(sb))], [vi("y", T.FLOAT, None)], opset=18)


@pytest.mark.parametrize("eq", sorted(EQUATIONS))
def test_decomposition_equals_einsum(eq):
    sa, sb = EQUATIONS[eq]
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(sa).astype(np.float32), rng.standard_normal(sb).astype(np.float32)
    model = _model(eq, sa, sb)
    r = decompose(prepare(model))
    assert not r.skipped and [n.op_type for n in r.model.graph.node].count("MatMul") == 1
    onnx.checker.check_model(r.model, full_check=True)
    got = plain_run(r.model, {"a": a, "b": b})[0]
    assert_bits_equal(got, plain_run(model, {"a": a, "b": b})[0], f"{eq} decomposed vs Einsum")
    np.testing.assert_allclose(got, np.einsum(eq, a, b), rtol=1e-5, atol=1e-5)


def _as_matmul(eq, a, b):
    """The [batch, M, K] @ [batch, K, N] operands the decomposition multiplies (numpy)."""
    f = einsum_as_matmul(eq)
    at = np.transpose(a, [f["a"].index(c) for c in f["batch"] + f["rows"] + f["sums"]])
    bt = np.transpose(b, [f["b"].index(c) for c in f["batch"] + f["sums"] + f["cols"]])
    nb = len(f["batch"])
    at = at.reshape(at.shape[:nb] + (-1, int(np.prod(at.shape[nb + len(f["rows"]):], dtype=np.int64))))
    bt = bt.reshape(bt.shape[:nb] + (int(np.prod(bt.shape[nb:nb + len(f["sums"])], dtype=np.int64)), -1))
    return at, bt


@pytest.mark.parametrize("eq", ["bhid,bhjd->bhij", "bid,de->bie", "bhqd,bkhd->bhqk", "abcd,cdef->abef"])
def test_einsum_site_against_reference(eq):
    sa, sb = EQUATIONS[eq]
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal(sa).astype(np.float32), rng.standard_normal(sb).astype(np.float32)
    model = _model(eq, sa, sb)
    sess = build(model)
    (site,) = sess.table.sites
    assert site.kind == "gemm" and site.op_type == "MatMul" and site.origin == "Einsum"
    feeds = {"a": a, "b": b}
    check_ber0(sess, model, feeds)  # fault-free: the original Einsum runs, bit for bit
    plans = sess.plans(feeds)
    at, bt = _as_matmul(eq, a, b)
    assert plans[0].k == at.shape[-1]
    clean_mm = np.matmul(at, bt)  # shape only; the base comes from onnxruntime's MatMul below
    mm_model = make_model([h.make_node("MatMul", ["x", "w"], ["p"])], [vi("x", T.FLOAT, list(at.shape)),
                          vi("w", T.FLOAT, list(bt.shape))], [vi("p", T.FLOAT, None)])
    base = plain_run(mm_model, {"x": np.ascontiguousarray(at), "w": np.ascontiguousarray(bt)})[0]
    assert base.shape == clean_mm.shape == plans[0].out_shape
    k, last = plans[0].k, plans[0].elements - 1
    hand_f = hand([(0, 0, 0, 0, 0), (0, 0, 0, 2 * k - 2, 30), (0, 0, last, k - 1, 5)]
                  + ([(0, 0, 1, k, 7)] if k > 1 else []))
    out_f = einsum_as_matmul(eq)
    for faults in (hand_f, merge(hand_f, sampled(plans, 5e-3, 3, minimum=5))):
        y = sess.run(feeds, faults)[0]
        # flat element of the site's output (its items need not be its first axis: [b*i, e])
        rows = [(int(i) * plans[0].elements + int(e), int(t), int(bit))
                for i, e, t, bit in zip(faults.item, faults.element, faults.step, faults.bit)]
        mm = R.matmul_applied_reference(at, bt, rows, "fp32", base)
        # undo the decomposition's output arrangement: [batch, M, N] -> batch + rows + cols -> output order
        letters = out_f["batch"] + out_f["rows"] + out_f["cols"]
        dims = {c: n for term, shape in ((out_f["a"], sa), (out_f["b"], sb)) for c, n in zip(term, shape)}
        want = mm.reshape([dims[c] for c in letters]).transpose([letters.index(c) for c in out_f["out"]])
        assert_bits_equal(y, np.ascontiguousarray(want), f"Einsum {eq}")
        seq = R.matmul_reference(at, bt, rows, "fp32").reshape([dims[c] for c in letters])
        assert_close(y, seq.transpose([letters.index(c) for c in out_f["out"]]), 1e-4, f"Einsum {eq} sequential")


@pytest.mark.parametrize("eq, reason", [
    ("ii,ij->j", "repeated letter"), ("ij,jk,kl->il", "3 operand"), ("ij,jk", "implicit output"),
    ("ij,kl->i", "summed within one operand"), ("...ij,...jk->...ik", "ellipsis"),
])
def test_other_equations_are_non_sites_with_the_reason(eq, reason):
    assert reason in einsum_as_matmul(eq)
    n_in = eq.split("->")[0].count(",") + 1
    model = make_model([h.make_node("Einsum", [f"x{i}" for i in range(n_in)], ["y"], equation=eq, name="weird"),
                        h.make_node("Mul", ["y", "y"], ["z"], name="square")],
                       [vi(f"x{i}", T.FLOAT, None) for i in range(n_in)], [vi("z", T.FLOAT, None)], opset=18)
    r = decompose(model)
    assert [(n, why) for n, why in r.skipped if n == "weird" and reason in why]
