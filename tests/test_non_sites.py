"""``inspect`` lists every node that is not a site, with the reason; "no fault sites" says why."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from onnxft import api
from onnxft.passes.inject import InjectError, inject, selection_from_options
from test_inject_reference import make_model, vi


def _mixed_model():
    """A MatMul site among data movement, integer shape arithmetic, an unsupported Einsum, an
    If whose branch holds arithmetic, and a comparison."""
    then_g = h.make_graph([h.make_node("Mul", ["y", "y"], ["t"], name="branch_mul")], "then", [],
                          [vi("t", T.FLOAT, None)])
    else_g = h.make_graph([h.make_node("Identity", ["y"], ["e"], name="branch_id")], "else", [],
                          [vi("e", T.FLOAT, None)])
    nodes = [
        h.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
        h.make_node("Shape", ["y"], ["s"], name="shape"),
        h.make_node("Mul", ["s", "two"], ["s2"], name="shape_mul"),
        h.make_node("Reshape", ["y", "flat"], ["r"], name="reshape"),
        h.make_node("Einsum", ["y", "y"], ["tr"], name="trace", equation="ij,kj->j"),
        h.make_node("ReduceSum", ["tr"], ["trs"], name="total", keepdims=0),
        h.make_node("Greater", ["trs", "zero"], ["c"], name="positive"),
        h.make_node("If", ["c"], ["z"], name="branch", then_branch=then_g, else_branch=else_g),
    ]
    inits = [nh.from_array(np.ones((4, 3), np.float32), "w"), nh.from_array(np.array(2, np.int64), "two"),
             nh.from_array(np.array([-1], np.int64), "flat"), nh.from_array(np.array(0, np.float32), "zero")]
    return make_model(nodes, [vi("x", T.FLOAT, [2, 4])],
                      [vi("z", T.FLOAT, None), vi("r", T.FLOAT, None), vi("s2", T.INT64, None)], inits, opset=18)


def test_inspect_lists_every_non_site_with_its_reason(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_mixed_model(), path)
    info = api.inspect(str(path))
    assert [s["node"] for s in info["sites"]] == ["mm", "total", "branch/then/branch_mul"]  # branches hold sites
    why = {r["node"]: r["reason"] for r in info["non_sites"]}
    assert why["shape"] == "data movement" and why["reshape"] == "data movement"
    assert why["shape_mul"].startswith("integer arithmetic")
    assert why["trace"].startswith("Einsum 'ij,kj->j': letter(s) 'ik' summed within one operand")
    assert why["positive"].startswith("comparison")
    assert why["branch"].startswith("control flow")
    assert why["branch_id"] == "data movement (inside an If branch)"
    assert "branch_mul" not in why and "mm" not in why
    from onnxft.campaigns.inspect import inspect_table
    table = inspect_table(info)
    assert "not sites: 7 nodes" in table and "data movement (inside an If branch): branch_id" in table


def test_no_sites_error_says_why():
    model = _mixed_model()
    with pytest.raises(InjectError, match=r"filtered out all 2 candidate site\(s\)"):
        inject(model, selection_from_options(names="^nothing$"))
    with pytest.raises(InjectError, match=r"filtered out all 2 candidate"):
        inject(model, selection_from_options(formats=["fp16"]))
    data_only = make_model([h.make_node("Transpose", ["x"], ["y"], name="t", perm=[1, 0])],
                           [vi("x", T.FLOAT, [2, 3])], [vi("y", T.FLOAT, None)])
    with pytest.raises(InjectError, match="no arithmetic op that onnxft faults .*1 x data movement"):
        inject(data_only)
    then_g = h.make_graph([h.make_node("Max", ["x", "x"], ["t"], name="inner")], "then", [], [vi("t", T.FLOAT, None)])
    only_if = make_model([h.make_node("If", ["c"], ["y"], name="if", then_branch=then_g, else_branch=then_g)],
                         [vi("c", T.BOOL, []), vi("x", T.FLOAT, [2])], [vi("y", T.FLOAT, None)])
    with pytest.raises(InjectError, match=r"no arithmetic op that onnxft faults .*2 x selection or sign .*inside an If branch"):
        inject(only_if)


def test_cli_no_sites_is_one_line(tmp_path):
    from click.testing import CliRunner

    from onnxft.cli.main import cli
    path = tmp_path / "m.onnx"
    onnx.save(_mixed_model(), path)
    r = CliRunner().invoke(cli, ["inspect", str(path), "--sites", "^nothing$"])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "filtered out all 2 candidate" in r.output
