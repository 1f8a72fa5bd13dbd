"""Grouping of fault sites into layers, modules and op types, on PyTorch-style, tf2onnx/Keras-style
and unnamed exports, and on the bundled samples."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from models import tiny_cnn, tiny_transformer
from onnxft.analysis import grouping
from onnxft.faults.sites import SiteTable
from onnxft.passes.inject import inject, prepare


def residual_mlp(stem: str, block, head: str, blocks: int = 3, dim: int = 4) -> onnx.ModelProto:
    """x -> MatMul (stem) -> blocks x [MatMul, Relu, residual Add] -> MatMul (head). ``block(i, part)``
    names the nodes of block i."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array(rng.standard_normal((dim, dim)).astype(np.float32), f"w{i}") for i in range(blocks + 2)]
    nodes = [h.make_node("MatMul", ["x", "w0"], ["t0"], name=stem)]
    for i in range(blocks):
        nodes += [h.make_node("MatMul", [f"t{i}", f"w{i + 1}"], [f"m{i}"], name=block(i, "dense/MatMul")),
                  h.make_node("Relu", [f"m{i}"], [f"r{i}"], name=block(i, "relu/Relu")),
                  h.make_node("Add", [f"t{i}", f"r{i}"], [f"t{i + 1}"], name=block(i, "add/Add"))]
    nodes.append(h.make_node("MatMul", [f"t{blocks}", f"w{blocks + 1}"], ["y"], name=head))
    g = h.make_graph(nodes, "mlp", [h.make_tensor_value_info("x", T.FLOAT, ["batch", dim])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["batch", dim])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def _layers(model):
    p = prepare(model)
    table = SiteTable.from_model(inject(p, prepared=True).model)
    return {g.name: sorted(table.sites[i].node for i in g.sites) for g in grouping.layers(table, p)}


STYLES = {
    "pytorch": ("/embed/MatMul", lambda i, p: f"/layers.{i}/{p}", "/head/MatMul", "layers.{}"),
    "pytorch-nested": ("/conv1/MatMul", lambda i, p: f"/layer2/layer2.{i}/{p}", "/fc/MatMul", "layer2.{}"),
    "huggingface": ("/embeddings/MatMul", lambda i, p: f"/encoder/layer.{i}/{p}", "/classifier/MatMul", "layer.{}"),
    "tf2onnx": ("StatefulPartitionedCall/model/dense/MatMul",
                lambda i, p: f"StatefulPartitionedCall/model/block_{i}/{p}",
                "StatefulPartitionedCall/model/dense_1/MatMul", "block_{}"),
    "keras-applications": ("StatefulPartitionedCall/resnet/conv1_conv/MatMul",
                           lambda i, p: f"StatefulPartitionedCall/resnet/conv2_block{i + 1}_{p.replace('/', '_')}/op",
                           "StatefulPartitionedCall/resnet/predictions/MatMul", "conv2_block{}"),
}


@pytest.mark.parametrize("style", sorted(STYLES))
def test_layers_from_export_scopes(style):
    stem, block, head, layer = STYLES[style]
    groups = _layers(residual_mlp(stem, block, head))
    offset = 1 if style == "keras-applications" else 0
    names = [layer.format(i + offset) for i in range(3)]
    assert list(groups) == ["stem"] + names + ["head"]
    assert groups["stem"] == [stem] and groups["head"] == [head]
    for i, name in enumerate(names):
        assert groups[name] == sorted([block(i, "dense/MatMul"), block(i, "add/Add")])  # Relu is no site


def test_keras_uniquifying_suffixes_are_not_layers():
    # Keras names every repeated layer type dense, dense_1, dense_2: none of them is a block.
    groups = _layers(residual_mlp("model/dense/MatMul", lambda i, p: f"model/dense_{i + 2}/{p}",
                                  "model/dense_1/MatMul"))
    # no name gives a layer, so the structural fallback cuts at the residual joins
    assert list(groups) == ["segment.0", "segment.1", "segment.2", "head"]


def test_structural_fallback_cuts_at_residual_joins():
    groups = _layers(residual_mlp("n_stem", lambda i, p: f"n{i}_{p.split('/')[0]}", "n_head"))
    assert list(groups) == ["segment.0", "segment.1", "segment.2", "head"]
    assert groups["segment.0"] == sorted(["n_stem", "n0_dense", "n0_add"])  # the stem joins the first segment
    assert groups["segment.2"] == sorted(["n2_dense", "n2_add"])
    assert groups["head"] == ["n_head"]


def test_sample_layers():
    from onnxft.api import load

    vit = _layers(load("vit")[0])
    assert list(vit) == ["stem", *(f"blocks.{i}" for i in range(6)), "head"]
    assert all(len(vit[f"blocks.{i}"]) == 41 for i in range(6))
    assert vit["stem"] == sorted(["/patch_embed/proj/Conv", "/Add"])
    resnet = _layers(load("resnet")[0])
    assert list(resnet) == ["stem", *(f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)), "head"]
    assert "/layer2/layer2.0/downsample/downsample.0/Conv" in resnet["layer2.0"]


def _modules(model):
    table = SiteTable.from_model(inject(model).model)
    return {g.name: {table.sites[i].node for i in g.sites} for g in grouping.modules(table)}


def test_transformer_modules():
    mods = _modules(tiny_transformer())
    assert {"/blocks.0/attn/q/MatMul", "/blocks.0/attn/k/MatMul", "/blocks.0/attn/v/MatMul",
            "/blocks.0/attn/MatMul", "/blocks.0/attn/MatMul_1", "/blocks.0/attn/Mul"} == mods["MHA linear"]
    assert mods["FF linear"] == {"/blocks.0/mlp/fc1/MatMul", "/blocks.0/mlp/fc1/Add", "/blocks.0/mlp/fc2/MatMul"}
    nonlin = mods["non-linear"]
    assert {"/blocks.0/mlp/act/Erf", "/blocks.0/mlp/act/Mul_1", "/blocks.0/attn/Softmax/Exp",
            "/blocks.0/norm1/LayerNormalization/Sqrt", "/pool/ReduceMean"} <= nonlin
    assert {"/blocks.0/Add", "/blocks.0/Add_1", "/head/Gemm/MatMul"} <= mods["other"]


def test_cnn_modules():
    mods = _modules(tiny_cnn())
    assert mods["Conv"] == {"/layer1/conv/Conv", "/layer2/conv/Conv"}
    assert mods["FC"] == {"/fc/Gemm/MatMul", "/fc/Gemm/Add"}
    assert mods["non-linear"] == {"/layer1/bn/BatchNormalization/Mul", "/layer1/bn/BatchNormalization/Add"}


def test_sample_vit_modules_cover_every_site_once():
    from onnxft.api import load

    table = SiteTable.from_model(inject(load("vit")[0]).model)
    groups = grouping.modules(table)
    seen = [i for g in groups for i in g.sites]
    assert sorted(seen) == list(range(len(table.sites)))
    by = {g.name: [table.sites[i] for i in g.sites] for g in groups}
    assert sum(s.op_type == "MatMul" for s in by["MHA linear"]) == 4 * 6  # qkv, QK^T, attn@V, proj
    assert sum(s.op_type == "MatMul" for s in by["FF linear"]) == 2 * 6
    assert {s.origin for s in by["non-linear"]} >= {"Softmax", "LayerNormalization", "Erf"}
    ops = {g.name: g.sites for g in grouping.op_types(table)}
    assert len(ops["LayerNormalization"]) == 13 * 9 and len(ops["Softmax"]) == 6 * 5


def test_structural_fallback_of_a_plain_chain():
    groups = _layers(tiny_cnn())  # /layer1/... has no numbered scope; no residual joins either
    assert groups == {"segment.0": sorted(["/layer1/conv/Conv", "/layer1/bn/BatchNormalization/Mul",
                                           "/layer1/bn/BatchNormalization/Add"]),
                      "segment.1": ["/layer2/conv/Conv"], "segment.2": sorted(["/fc/Gemm/MatMul", "/fc/Gemm/Add"])}
