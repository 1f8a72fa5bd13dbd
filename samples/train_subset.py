"""Write the bundled labelled TRAINING subset, ``onnxft/data/samples/fashion_mnist_train.npz``.

It holds the last 2000 images of the official Fashion-MNIST training split: the validation split
that ``train_samples.py`` held out, so the sample models never trained on them, and they are
distinct from the test subset (which comes from the t10k split). onnxft uses it where a step needs
labelled data other than the test data: threshold training of clipped activations
(``onnxft harden --clip``, docs/proact.md). numpy only; the data comes from Debian's
``dataset-fashion-mnist`` package (``apt-get install -y dataset-fashion-mnist``).

    python samples/train_subset.py            # writes the .npz and its manifest entry
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from train_samples import CLASSES, DEFAULT_DATA_DIR, DEFAULT_OUT, MEAN, N_VAL, STD, load_fashion_mnist, normalise

FILE = "fashion_mnist_train.npz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    x_train, y_train, _, _ = load_fashion_mnist(args.data_dir)
    x, y = normalise(x_train[-N_VAL:]), y_train[-N_VAL:].astype(np.int64)
    path = args.out / FILE
    np.savez_compressed(path, x=x, y=y)
    manifest_path = args.out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["train_dataset"] = {
        "name": "Fashion-MNIST", "file": FILE, "n": int(len(y)),
        "subset": f"last {N_VAL} images of the official training split (the validation split the sample models "
                  "were not trained on; distinct from the test subset)",
        "arrays": {"x": {"dtype": "float32", "shape": list(x.shape)}, "y": {"dtype": "int64", "shape": list(y.shape)}},
        "class_counts": np.bincount(y, minlength=len(CLASSES)).tolist(),
        "normalisation": {"mean": MEAN, "std": STD, "formula": "(pixel / 255 - mean) / std"},
        "source": "Debian package dataset-fashion-mnist", "license": "MIT (Zalando Research)",
        "used_for": "threshold training of clipped activations (onnxft harden --clip, docs/proact.md)",
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes, {len(y)} items) and {manifest_path}")


if __name__ == "__main__":
    main()
