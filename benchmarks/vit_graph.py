"""A standard ViT image classifier as an ONNX graph with random weights, laid out the way torch.onnx
exports timm's VisionTransformer at opset 17 (fused LayerNormalization, Erf-form GELU, PyTorch-style
node scopes). Depends on onnx and numpy only, so benchmarks can build full-size graphs without torch.

    python benchmarks/vit_graph.py --preset vit-b16 -o /tmp/vitb16.onnx
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

PRESETS = {
    "vit-b16": dict(image=224, patch=16, dim=768, depth=12, heads=12),
    "vit-s16": dict(image=224, patch=16, dim=384, depth=12, heads=6),
    "vit-tiny16": dict(image=224, patch=16, dim=192, depth=12, heads=3),
    "vit-s16-dyn": dict(image=224, patch=16, dim=384, depth=12, heads=6, dynamic_tokens=True),
}


def build_vit(image: int = 224, patch: int = 16, dim: int = 768, depth: int = 12, heads: int = 12,
              mlp_ratio: int = 4, classes: int = 1000, channels: int = 3, seed: int = 0,
              opset: int = 17, dynamic_tokens: bool = False) -> onnx.ModelProto:
    """x [batch, channels, image, image] float32 -> logits [batch, classes]; weights ~ N(0, 0.02).

    ``dynamic_tokens``: the input is ``[batch, channels, height, width]`` (any multiple of the patch
    size up to ``image``), so the token axis is dynamic in every block, as in DINOv2 exports; the
    position embedding is sliced to the run-time token count (DINOv2 interpolates it)."""
    if opset < 17:
        raise ValueError("the fused LayerNormalization op needs opset 17 or later")
    if image % patch:
        raise ValueError(f"image size {image} is not a multiple of the patch size {patch}")
    if dim % heads:
        raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
    hd = dim // heads
    hidden = int(dim * mlp_ratio)
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def init(name, arr):
        inits.append(nh.from_array(np.asarray(arr), name))  # (ascontiguousarray would make 0-d arrays 1-d)
        return name

    def rand(name, *shape):
        return init(name, (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)))

    def const(name, value, dtype=np.float32):
        return init(name, np.array(value, dtype=dtype))

    def node(op, name, inputs, n_out=1, **attrs):
        outs = [f"{name}_output_{i}" for i in range(n_out)]
        nodes.append(h.make_node(op, inputs, outs, name=name, **attrs))
        return outs[0] if n_out == 1 else outs

    def linear(x, scope, fan_in, fan_out):
        w = rand(f"{scope[1:].replace('/', '.')}.weight", fan_in, fan_out)  # stored transposed, as exported
        b = init(f"{scope[1:].replace('/', '.')}.bias", np.zeros(fan_out, np.float32))
        return node("Add", f"{scope}/Add", [node("MatMul", f"{scope}/MatMul", [x, w]), b])

    def layer_norm(x, scope):
        s = init(f"{scope[1:].replace('/', '.')}.weight", np.ones(dim, np.float32))
        b = init(f"{scope[1:].replace('/', '.')}.bias", np.zeros(dim, np.float32))
        return node("LayerNormalization", f"{scope}/LayerNormalization", [x, s, b], axis=-1, epsilon=1e-6)

    # shared constants (what constant folding leaves behind)
    c_tokens = const("const_reshape_tokens", [0, 0, -1], np.int64)
    c_qkv = const("const_reshape_qkv", [0, 0, 3, heads, hd], np.int64)
    c_merge = const("const_reshape_merge", [0, 0, dim], np.int64)
    c_i0 = const("const_idx_0", 0, np.int64)
    c_i1 = const("const_idx_1", 1, np.int64)
    c_i2 = const("const_idx_2", 2, np.int64)
    c_axes0 = const("const_axes_0", [0], np.int64)
    c_rest = const("const_cls_rest", [1, dim], np.int64)
    c_scale = const("const_attn_scale", 1.0 / math.sqrt(hd))
    c_sqrt2 = const("const_sqrt2", math.sqrt(2.0))
    c_one = const("const_one", 1.0)
    c_half = const("const_half", 0.5)

    # patch embedding: Conv -> flatten(2) -> transpose(1, 2)
    pw = rand("patch_embed.proj.weight", dim, channels, patch, patch)
    pb = init("patch_embed.proj.bias", np.zeros(dim, np.float32))
    x = node("Conv", "/patch_embed/proj/Conv", ["x", pw, pb], kernel_shape=[patch, patch],
             strides=[patch, patch], pads=[0, 0, 0, 0], dilations=[1, 1], group=1)
    x = node("Reshape", "/patch_embed/Reshape", [x, c_tokens])
    x = node("Transpose", "/patch_embed/Transpose", [x], perm=[0, 2, 1])

    # class token expanded to the batch, concatenated in front; position embedding added
    cls = rand("cls_token", 1, 1, dim)
    shape = node("Shape", "/Shape", ["x"])
    bsz = node("Gather", "/Gather", [shape, c_i0], axis=0)
    bsz = node("Unsqueeze", "/Unsqueeze", [bsz, c_axes0])
    target = node("Concat", "/Concat", [bsz, c_rest], axis=0)
    cls = node("Expand", "/Expand", [cls, target])
    x = node("Concat", "/Concat_1", [cls, x], axis=1)
    tokens = (image // patch) ** 2 + 1
    pos = rand("pos_embed", 1, tokens, dim)
    if dynamic_tokens:
        n_tok = node("Slice", "/pos_embed/Slice_shape", [node("Shape", "/pos_embed/Shape", [x]),
                                                         const("const_axis_1", [1], np.int64),
                                                         const("const_axis_2", [2], np.int64)])
        pos = node("Slice", "/pos_embed/Slice", [pos, const("const_start_0", [0], np.int64), n_tok,
                                                 const("const_axes_1", [1], np.int64)])
    x = node("Add", "/Add", [x, pos])

    for i in range(depth):
        blk = f"/blocks.{i}"
        a = layer_norm(x, f"{blk}/norm1")
        qkv = linear(a, f"{blk}/attn/qkv", dim, 3 * dim)
        qkv = node("Reshape", f"{blk}/attn/Reshape", [qkv, c_qkv])
        qkv = node("Transpose", f"{blk}/attn/Transpose", [qkv], perm=[2, 0, 3, 1, 4])
        q = node("Gather", f"{blk}/attn/Gather", [qkv, c_i0], axis=0)
        k = node("Gather", f"{blk}/attn/Gather_1", [qkv, c_i1], axis=0)
        v = node("Gather", f"{blk}/attn/Gather_2", [qkv, c_i2], axis=0)
        kt = node("Transpose", f"{blk}/attn/Transpose_1", [k], perm=[0, 1, 3, 2])
        s = node("MatMul", f"{blk}/attn/MatMul", [q, kt])
        s = node("Mul", f"{blk}/attn/Mul", [s, c_scale])
        p = node("Softmax", f"{blk}/attn/Softmax", [s], axis=-1)
        o = node("MatMul", f"{blk}/attn/MatMul_1", [p, v])
        o = node("Transpose", f"{blk}/attn/Transpose_2", [o], perm=[0, 2, 1, 3])
        o = node("Reshape", f"{blk}/attn/Reshape_1", [o, c_merge])
        o = linear(o, f"{blk}/attn/proj", dim, dim)
        x = node("Add", f"{blk}/Add", [x, o])

        m = layer_norm(x, f"{blk}/norm2")
        m = linear(m, f"{blk}/mlp/fc1", dim, hidden)
        g = node("Div", f"{blk}/mlp/act/Div", [m, c_sqrt2])
        g = node("Erf", f"{blk}/mlp/act/Erf", [g])
        g = node("Add", f"{blk}/mlp/act/Add", [g, c_one])
        g = node("Mul", f"{blk}/mlp/act/Mul", [m, g])
        g = node("Mul", f"{blk}/mlp/act/Mul_1", [g, c_half])
        m = linear(g, f"{blk}/mlp/fc2", hidden, dim)
        x = node("Add", f"{blk}/Add_1", [x, m])

    x = layer_norm(x, "/norm")
    x = node("Gather", "/Gather_1", [x, c_i0], axis=1)
    hw = rand("head.weight", dim, classes)
    hb = init("head.bias", np.zeros(classes, np.float32))
    x = node("MatMul", "/head/MatMul", [x, hw])
    nodes.append(h.make_node("Add", [x, hb], ["logits"], name="/head/Add"))

    graph = h.make_graph(
        nodes, "vit", [h.make_tensor_value_info("x", T.FLOAT, ["batch", channels] + (
            ["height", "width"] if dynamic_tokens else [image, image]))],
        [h.make_tensor_value_info("logits", T.FLOAT, ["batch", classes])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], ir_version=8,
                         producer_name="onnxft-benchmarks")
    return model


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items(), key=lambda kv: (-kv[1], kv[0])))


def save_atomic(model: onnx.ModelProto, path: str | Path) -> None:
    """Write ``model`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="vit-b16")
    ap.add_argument("-o", "--output", required=True, help="where to write the .onnx file")
    ap.add_argument("--image", type=int)
    ap.add_argument("--patch", type=int)
    ap.add_argument("--dim", type=int)
    ap.add_argument("--depth", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--no-check", action="store_true", help="skip onnx.checker")
    ap.add_argument("--dynamic-tokens", action="store_true",
                    help="input [batch, C, height, width]: a dynamic token axis in every block")
    args = ap.parse_args(argv)
    cfg = dict(PRESETS[args.preset])
    for k in ("image", "patch", "dim", "depth", "heads"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    if args.dynamic_tokens:
        cfg["dynamic_tokens"] = True
    model = build_vit(**cfg, classes=args.classes, seed=args.seed, opset=args.opset)
    if not args.no_check:
        onnx.checker.check_model(model, full_check=True)
    save_atomic(model, args.output)
    n_params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    print(f"wrote {args.output}: {args.preset} {cfg}, {len(model.graph.node)} nodes, {n_params / 1e6:.1f}M params")
    print("ops: " + ", ".join(f"{k} {v}" for k, v in op_histogram(model).items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
