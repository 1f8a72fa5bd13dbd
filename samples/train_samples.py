#!/usr/bin/env python3
"""Train, export and quantise the sample models bundled with onnxft.

This is a *development-time* script: it needs PyTorch (``pip install
torch==2.13.0``), but nothing it produces needs PyTorch at run time.  It
produces, in ``onnxft/data/samples/`` by default::

    vit.onnx               small Vision Transformer, fp32
    vit_int8.onnx          the same, int8 QDQ (static quantisation)
    resnet.onnx            ResNet-20-style CNN, fp32
    resnet_int8.onnx       the same, int8 QDQ (static quantisation)
    fashion_mnist_test.npz first 2000 images of the official test set
                           (x: float32 [2000,1,28,28] normalised, y: int64 [2000])
    manifest.json          what the files are, and their clean top-1 accuracy
                           on fashion_mnist_test.npz measured with onnxruntime

Data: the real Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017) as shipped by the
Debian package ``dataset-fashion-mnist`` (idx files, gzip-compressed, in
``/usr/share/datasets/fashion-mnist``)::

    apt-get install -y dataset-fashion-mnist

Usage (from the repository root)::

    python samples/train_samples.py                      # defaults used for the bundled files
    python samples/train_samples.py --vit-epochs 1 --resnet-epochs 1 --out /tmp/s   # quick smoke run

Everything is seeded (``--seed``, default 0) and run on the CPU with
``torch.set_num_threads(--threads)``; reruns on the same machine and library
versions give the same weights.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "onnxft" / "data" / "samples"
DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")

MEAN = 0.2860
STD = 0.3530
N_SUBSET = 2000  # first N images of the official test set go into the npz
N_CALIB = 256  # training images used to calibrate static int8 quantisation
N_VAL = 2000  # last N training images held out (monitoring, quantisation choice)
OPSET = 17
CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------

def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed) into a numpy array.

    IDX header: two zero bytes, a type code (0x08 = uint8), the number of
    dimensions, then one big-endian uint32 per dimension.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} values, found {arr.size}")
    return arr.reshape(tuple(int(d) for d in dims))


def load_fashion_mnist(data_dir: Path):
    """Return (x_train, y_train, x_test, y_test) as uint8 / int64 arrays."""
    names = {
        "x_train": "train-images-idx3-ubyte",
        "y_train": "train-labels-idx1-ubyte",
        "x_test": "t10k-images-idx3-ubyte",
        "y_test": "t10k-labels-idx1-ubyte",
    }
    out = {}
    for key, stem in names.items():
        candidates = [data_dir / (stem + ".gz"), data_dir / stem]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            sys.exit(
                f"error: Fashion-MNIST file {stem}[.gz] not found in {data_dir}.\n"
                "Install the Debian package with\n"
                "    apt-get install -y dataset-fashion-mnist\n"
                "or point --data-dir at a directory holding the four idx files."
            )
        out[key] = read_idx(path)
    assert out["x_train"].shape == (60000, 28, 28), out["x_train"].shape
    assert out["x_test"].shape == (10000, 28, 28), out["x_test"].shape
    return (out["x_train"], out["y_train"].astype(np.int64),
            out["x_test"], out["y_test"].astype(np.int64))


def normalise(x_uint8: np.ndarray) -> np.ndarray:
    """uint8 [N,28,28] -> float32 [N,1,28,28], (x/255 - MEAN) / STD."""
    x = x_uint8.astype(np.float32) / np.float32(255.0)
    x = (x - np.float32(MEAN)) / np.float32(STD)
    return np.ascontiguousarray(x[:, None, :, :], dtype=np.float32)


# --------------------------------------------------------------------------
# Models (torch is imported lazily so the data helpers work without it)
# --------------------------------------------------------------------------

def build_models():
    import torch
    from torch import nn

    class Attention(nn.Module):
        """Multi-head self-attention written out with plain ops.

        Deliberately not nn.MultiheadAttention / scaled_dot_product_attention,
        so that the exported ONNX graph shows MatMul -> Mul -> Softmax -> MatMul.
        """

        def __init__(self, dim: int, num_heads: int, num_tokens: int):
            super().__init__()
            self.dim = dim
            self.num_tokens = num_tokens  # static, so the ONNX Reshapes get constant shapes
            self.num_heads = num_heads
            self.head_dim = dim // num_heads
            self.scale = self.head_dim ** -0.5
            self.qkv = nn.Linear(dim, dim * 3)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x):
            n, c = self.num_tokens, self.dim
            qkv = self.qkv(x).reshape(-1, n, 3, self.num_heads, self.head_dim)
            qkv = qkv.permute(2, 0, 3, 1, 4)  # [3, B, H, N, hd]
            q, k, v = qkv[0], qkv[1], qkv[2]
            attn = (q @ k.transpose(-2, -1)) * self.scale
            attn = attn.softmax(dim=-1)
            x = (attn @ v).transpose(1, 2).reshape(-1, n, c)
            return self.proj(x)

    class Mlp(nn.Module):
        def __init__(self, dim: int, hidden: int):
            super().__init__()
            self.fc1 = nn.Linear(dim, hidden)
            self.act = nn.GELU()  # exact (erf) GELU
            self.fc2 = nn.Linear(hidden, dim)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    class Block(nn.Module):
        """Pre-norm transformer encoder block."""

        def __init__(self, dim: int, num_heads: int, mlp_ratio: int, num_tokens: int):
            super().__init__()
            self.norm1 = nn.LayerNorm(dim)
            self.attn = Attention(dim, num_heads, num_tokens)
            self.norm2 = nn.LayerNorm(dim)
            self.mlp = Mlp(dim, dim * mlp_ratio)

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            x = x + self.mlp(self.norm2(x))
            return x

    class PatchEmbed(nn.Module):
        def __init__(self, patch: int, dim: int):
            super().__init__()
            self.proj = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)  # [B, 49, dim]

    class ViT(nn.Module):
        def __init__(self, img=28, patch=4, dim=128, depth=6, heads=4, mlp_ratio=4, classes=10):
            super().__init__()
            n_patches = (img // patch) ** 2
            self.patch_embed = PatchEmbed(patch, dim)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, dim))
            self.blocks = nn.Sequential(
                *[Block(dim, heads, mlp_ratio, n_patches + 1) for _ in range(depth)])
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, classes)
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)

        def forward(self, x):
            x = self.patch_embed(x)
            cls = self.cls_token.expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1) + self.pos_embed
            x = self.blocks(x)
            x = self.norm(x)
            return self.head(x[:, 0])

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + identity)

    class ResNet20(nn.Module):
        """ResNet-20-style network for 1x28x28 inputs (28 -> 28 -> 14 -> 7)."""

        def __init__(self, classes=10, widths=(16, 32, 64), blocks_per_stage=3):
            super().__init__()
            self.conv1 = nn.Conv2d(1, widths[0], 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(widths[0])
            self.relu = nn.ReLU()
            cin = widths[0]
            stages = []
            for i, w in enumerate(widths):
                layers = []
                for j in range(blocks_per_stage):
                    stride = 2 if (i > 0 and j == 0) else 1
                    layers.append(BasicBlock(cin, w, stride))
                    cin = w
                stages.append(nn.Sequential(*layers))
            self.layer1, self.layer2, self.layer3 = stages
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(widths[-1], classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        def forward(self, x):
            x = self.relu(self.bn1(self.conv1(x)))
            x = self.layer3(self.layer2(self.layer1(x)))
            x = torch.flatten(self.avgpool(x), 1)
            return self.fc(x)

    return ViT, ResNet20


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------

def augment(xb, gen, pad: int):
    """Cheap batch augmentation: random horizontal flip + random shift by up to
    ``pad`` pixels (zero padding in *raw* pixel space, i.e. the normalised
    background value)."""
    import torch
    import torch.nn.functional as F

    b = xb.shape[0]
    flip = torch.rand(b, generator=gen) < 0.5
    xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
    if pad > 0:
        bg = (0.0 - MEAN) / STD
        xp = F.pad(xb, (pad, pad, pad, pad), value=bg)
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
        ar = torch.arange(28)
        rows = (oy[:, None] + ar)[:, :, None]  # [B,28,1]
        cols = (ox[:, None] + ar)[:, None, :]  # [B,1,28]
        xb = xp[torch.arange(b)[:, None, None], 0, rows, cols][:, None]
    return xb


def evaluate_torch(model, x, y, batch=1000) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            logits = model(torch.from_numpy(x[i:i + batch]))
            correct += int((logits.argmax(1).numpy() == y[i:i + batch]).sum())
    return correct / len(x)


def train(model, name, x_tr, y_tr, x_val, y_val, *, epochs, batch, lr, wd, warmup,
          label_smoothing, pad, seed, channels_last=False):
    import torch
    import torch.nn.functional as F

    if channels_last:  # ~10% faster CPU convolutions; undone before export
        model.to(memory_format=torch.channels_last)

    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(x_tr)
    yt = torch.from_numpy(y_tr)
    steps_per_epoch = len(xt) // batch  # drop the last partial batch
    total = epochs * steps_per_epoch
    warm = int(warmup * steps_per_epoch)

    # no weight decay on biases, norm parameters, cls token, position embedding
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or n in ("cls_token", "pos_embed") else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)

    def lr_at(step):  # linear warm-up, then cosine decay to 0
        if step < warm:
            return lr * (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return lr * 0.5 * (1.0 + math.cos(math.pi * t))

    log(f"{name}: {sum(p.numel() for p in model.parameters()):,} params, "
        f"{epochs} epochs x {steps_per_epoch} steps, batch {batch}, lr {lr}")
    t0 = time.time()
    step = 0
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        run_loss, run_n = 0.0, 0
        for i in range(steps_per_epoch):
            idx = perm[i * batch:(i + 1) * batch]
            xb = augment(xt[idx], gen, pad)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yb = yt[idx]
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            loss = F.cross_entropy(model(xb), yb, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            run_loss += loss.item() * len(yb)
            run_n += len(yb)
            if (i + 1) % 100 == 0:
                log(f"{name} ep {ep + 1} step {i + 1}/{steps_per_epoch} "
                    f"loss {run_loss / run_n:.4f} ({time.time() - t0:.0f}s)")
        val = evaluate_torch(model, x_val, y_val)
        log(f"{name} epoch {ep + 1}/{epochs}: train loss {run_loss / run_n:.4f}, "
            f"val acc {val:.4f}, elapsed {time.time() - t0:.0f}s")
    model.eval()
    model.to(memory_format=torch.contiguous_format)
    return time.time() - t0


# --------------------------------------------------------------------------
# ONNX export, checks, quantisation
# --------------------------------------------------------------------------

def ort_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    # Level BASIC: the QDQ graph's own float semantics, as onnxft evaluates it (level ALL rewrites
    # QDQ MatMul/Conv into integer kernels that round and saturate differently).
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_top1(path: Path, x: np.ndarray, y: np.ndarray, batch=250) -> float:
    sess = ort_session(path)
    correct = 0
    for i in range(0, len(x), batch):
        (logits,) = sess.run(["logits"], {"x": x[i:i + batch]})
        correct += int((logits.argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


def export_onnx(model, path: Path, x_check: np.ndarray) -> None:
    import onnx
    import torch

    model.eval()
    dummy = torch.from_numpy(x_check[:2])
    torch.onnx.export(
        model, (dummy,), str(path),
        dynamo=False,  # legacy TorchScript exporter: plain ops, scoped node names
        export_params=True,
        opset_version=OPSET,
        do_constant_folding=True,
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
    )
    onnx.checker.check_model(str(path), full_check=True)
    with torch.no_grad():
        ref = model(torch.from_numpy(x_check)).numpy()
    (got,) = ort_session(path).run(["logits"], {"x": x_check})
    err = float(np.abs(ref - got).max())
    log(f"exported {path.name}: {path.stat().st_size / 1e6:.2f} MB, "
        f"max |torch - ort| = {err:.2e}")
    if err > 1e-4:
        raise RuntimeError(f"{path.name}: onnxruntime differs from torch by {err:.2e} > 1e-4")


def quantise(fp32_path: Path, out_path: Path, calib: np.ndarray, x_val, y_val, tmp_dir: Path):
    """Static int8 QDQ quantisation; the activation type is chosen on the held-out
    validation split (never on the test set).  Returns a dict describing the choice."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod,
                                          QuantFormat, QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, data: np.ndarray, batch: int = 32):
            self.batches = [data[i:i + batch] for i in range(0, len(data), batch)]
            self.it = iter(self.batches)

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else {"x": b}

        def rewind(self):
            self.it = iter(self.batches)

    pre_path = tmp_dir / (fp32_path.stem + "_pre.onnx")
    try:
        quant_pre_process(str(fp32_path), str(pre_path), skip_symbolic_shape=True)
        src, pre = pre_path, "quant_pre_process (ORT basic optimisation + ONNX shape inference)"
    except Exception as e:  # pragma: no cover - fall back to the raw export
        log(f"quant_pre_process failed on {fp32_path.name} ({e}); quantising the raw export")
        src, pre = fp32_path, "none"

    best = None
    for act in (QuantType.QInt8, QuantType.QUInt8):
        cand = tmp_dir / f"{out_path.stem}_{act.name}.onnx"
        quantize_static(
            str(src), str(cand), Reader(calib),
            quant_format=QuantFormat.QDQ,
            activation_type=act,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
        )
        acc = ort_top1(cand, x_val, y_val)
        log(f"  {out_path.name}: activations {act.name} -> val acc {acc:.4f}")
        if best is None or acc > best[0]:
            best = (acc, act, cand)
    acc, act, cand = best
    model = onnx.load(str(cand))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(out_path))
    return {
        "method": "onnxruntime.quantization.quantize_static",
        "quant_format": "QDQ",
        "activation_type": act.name,
        "weight_type": "QInt8",
        "per_channel": True,
        "calibrate_method": "MinMax",
        "calibration_images": int(len(calib)),
        "pre_process": pre,
        "val_top1": round(acc, 4),
    }


def describe(path: Path) -> str:
    import onnx

    m = onnx.load(str(path))
    ops = Counter(n.op_type for n in m.graph.node)
    return ", ".join(f"{k}:{v}" for k, v in sorted(ops.items()))


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                    help="directory with the Fashion-MNIST idx(.gz) files")
    ap.add_argument("--vit-epochs", type=int, default=3)
    ap.add_argument("--resnet-epochs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=None,
                    help="if given, overrides both --vit-epochs and --resnet-epochs")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--limit-train", type=int, default=None,
                    help="use only the first N training images (smoke tests)")
    args = ap.parse_args(argv)
    if args.epochs is not None:
        args.vit_epochs = args.resnet_epochs = args.epochs

    import onnx  # noqa: F401  (fail early if missing)
    import onnxruntime  # noqa: F401
    try:
        import torch
    except ImportError:
        sys.exit("error: this script needs PyTorch: pip install torch==2.13.0")

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    tmp_dir = out / ".tmp_quant"
    tmp_dir.mkdir(exist_ok=True)

    # ---- data ----
    x_train_u8, y_train, x_test_u8, y_test = load_fashion_mnist(args.data_dir)
    x_train, x_test = normalise(x_train_u8), normalise(x_test_u8)
    log(f"Fashion-MNIST: train {x_train.shape}, test {x_test.shape}; "
        f"normalised train mean {x_train.mean():.4f} std {x_train.std():.4f}")
    x_tr, y_tr = x_train[:-N_VAL], y_train[:-N_VAL]
    x_val, y_val = x_train[-N_VAL:], y_train[-N_VAL:]
    if args.limit_train:
        x_tr, y_tr = x_tr[:args.limit_train], y_tr[:args.limit_train]
    rng = np.random.default_rng(args.seed)
    x_calib = x_tr[np.sort(rng.choice(len(x_tr), N_CALIB, replace=False))]
    x_sub, y_sub = x_test[:N_SUBSET], y_test[:N_SUBSET]

    npz_path = out / "fashion_mnist_test.npz"
    np.savez_compressed(npz_path, x=x_sub, y=y_sub)
    log(f"wrote {npz_path.name}: {npz_path.stat().st_size / 1e6:.2f} MB")

    # ---- models ----
    ViT, ResNet20 = build_models()
    specs = [
        dict(name="vit", cls=ViT, epochs=args.vit_epochs, lr=1e-3, wd=0.05, warmup=0.3,
             label_smoothing=0.1, pad=0, channels_last=False,
             arch="ViT: Conv2d 4x4/4 patch embedding (49 patches) + class token + learned "
                  "position embedding, dim 128, 6 pre-norm blocks, 4 heads (explicit "
                  "qkv/proj Linear, MatMul-Softmax-MatMul), MLP ratio 4, exact GELU, "
                  "final LayerNorm, Linear head on the class token",
             extra={"patch_size": 4, "embed_dim": 128, "depth": 6, "num_heads": 4,
                    "mlp_ratio": 4}),
        dict(name="resnet", cls=ResNet20, epochs=args.resnet_epochs, lr=2e-3, wd=0.05,
             warmup=0.3, label_smoothing=0.0, pad=0, channels_last=True,
             arch="ResNet-20-style: 3x3 conv stem (16 ch) + BN + ReLU, 3 stages "
                  "(layer1/2/3) of 3 basic blocks with 16/32/64 channels (stride 2 at "
                  "the start of layer2/3, 1x1 conv projection shortcuts), BatchNorm "
                  "(folded into Conv at export), ReLU, global average pooling, Linear",
             extra={"depth": 20, "widths": [16, 32, 64], "blocks_per_stage": 3}),
    ]
    entries = []
    timings = {}
    for spec in specs:
        torch.manual_seed(args.seed)
        model = spec["cls"]()
        n_params = sum(p.numel() for p in model.parameters())
        secs = train(model, spec["name"], x_tr, y_tr, x_val, y_val,
                     epochs=spec["epochs"], batch=args.batch, lr=spec["lr"], wd=spec["wd"],
                     warmup=spec["warmup"], label_smoothing=spec["label_smoothing"],
                     pad=spec["pad"], seed=args.seed, channels_last=spec["channels_last"])
        timings[spec["name"]] = secs
        full_test = evaluate_torch(model, x_test, y_test)
        log(f"{spec['name']}: trained in {secs:.0f}s; torch top-1 on full 10k test set "
            f"{full_test:.4f}")

        fp32_path = out / f"{spec['name']}.onnx"
        export_onnx(model, fp32_path, x_sub[:16])
        int8_path = out / f"{spec['name']}_int8.onnx"
        qinfo = quantise(fp32_path, int8_path, x_calib, x_val, y_val, tmp_dir)

        train_info = {"epochs": spec["epochs"], "batch": args.batch, "optimizer": "AdamW",
                      "lr": spec["lr"], "weight_decay": spec["wd"],
                      "schedule": f"linear warm-up {spec['warmup']} epoch, cosine to 0",
                      "label_smoothing": spec["label_smoothing"],
                      "augmentation": "random horizontal flip" + (
                          f", random shift <= {spec['pad']} px" if spec["pad"] else ""),
                      "train_images": int(len(x_tr)), "seed": args.seed,
                      "torch_top1_full_test_10k": round(full_test, 4)}
        for fmt, path in (("fp32", fp32_path), ("int8", int8_path)):
            acc = ort_top1(path, x_sub, y_sub)
            entry = {"name": spec["name"] + ("" if fmt == "fp32" else "_int8"),
                     "file": path.name, "format": fmt, "arch": spec["arch"],
                     **spec["extra"], "params": int(n_params),
                     "input": {"name": "x", "shape": ["batch", 1, 28, 28], "dtype": "float32"},
                     "output": {"name": "logits", "shape": ["batch", 10], "dtype": "float32"},
                     "opset": OPSET, "size_bytes": path.stat().st_size,
                     "clean_top1": round(acc, 4), "training": train_info}
            if fmt == "int8":
                entry["quantization"] = qinfo
                entry["source_model"] = fp32_path.name
            entries.append(entry)
            log(f"{path.name}: ORT top-1 on {N_SUBSET}-image subset {acc:.4f}; "
                f"ops {describe(path)}")

    for f in tmp_dir.iterdir():
        f.unlink()
    tmp_dir.rmdir()

    manifest = {
        "dataset": {
            "name": "Fashion-MNIST",
            "file": npz_path.name,
            "n": N_SUBSET,
            "subset": f"first {N_SUBSET} images of the official test set (t10k)",
            "arrays": {"x": {"dtype": "float32", "shape": [N_SUBSET, 1, 28, 28]},
                       "y": {"dtype": "int64", "shape": [N_SUBSET]}},
            "normalisation": {"mean": MEAN, "std": STD, "formula": "(pixel / 255 - mean) / std"},
            "classes": CLASSES,
            "source": "Debian package dataset-fashion-mnist",
            "license": "MIT (Zalando Research)",
        },
        "models": entries,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"wrote manifest.json; training {', '.join(f'{k} {v:.0f}s' for k, v in timings.items())}; "
        f"total wall time {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
