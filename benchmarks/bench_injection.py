"""Clean vs injected inference time (onnxft.api.bench) for a list of models, one table row each.

    python benchmarks/bench_injection.py                         # bundled sample `vit` and a ViT-B/16
    python benchmarks/bench_injection.py --models vit-s16 --repeats 5 --json /tmp/bench.json

A model is a path to an .onnx file, a bundled sample name (needs onnxft/data/samples/manifest.json),
or a preset of benchmarks/vit_graph.py (vit-b16, vit-s16, vit-tiny16), built with random weights
into a temporary folder.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import onnxft.api as ft  # noqa: E402
from onnxft import samples as ft_samples  # noqa: E402
from onnxft.report.outputs import atomic_write  # noqa: E402
from vit_graph import PRESETS, build_vit, save_atomic  # noqa: E402

DEFAULT_MODELS = "vit,vit-b16"
COLUMNS = [("model", "{:<14}"), ("sites", "{:>6}"), ("batch", "{:>5}"), ("BER", "{:>8}"), ("clean ms", "{:>10}"),
           ("injected ms", "{:>11}"), ("ratio", "{:>6}"), ("flips/run", "{:>9}")]


def resolve(name: str, tmp: Path) -> str | None:
    """A path to run ``name`` from, or None (with a message) when it is not available."""
    if name in PRESETS:
        path = tmp / f"{name}.onnx"
        if not path.exists():
            print(f"# building {name} {PRESETS[name]} with random weights ...", file=sys.stderr, flush=True)
            save_atomic(build_vit(**PRESETS[name]), path)
        return str(path)
    if Path(name).exists() or name.endswith(".onnx") or "/" in name:
        if not Path(name).is_file():
            print(f"# skipping {name}: no such file", file=sys.stderr)
            return None
        return name
    manifest = ft_samples.samples_dir() / "manifest.json"
    if not manifest.is_file():
        print(f"# skipping sample {name!r}: {manifest} does not exist (samples not trained yet)", file=sys.stderr)
        return None
    path, _ = ft_samples.resolve_model(name)
    if not Path(path).is_file():
        print(f"# skipping {name!r}: not a bundled sample or a file", file=sys.stderr)
        return None
    return path


def fmt_row(cells: list) -> str:
    return "  ".join(f.format(c) for c, (_, f) in zip(cells, COLUMNS))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT_MODELS,
                    help=f"comma list of .onnx paths, sample names or {'/'.join(PRESETS)} (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ber", type=float, default=1e-8)
    ap.add_argument("--provider", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON here")
    args = ap.parse_args(argv)

    rows = []
    print(fmt_row([c for c, _ in COLUMNS]))
    with tempfile.TemporaryDirectory(prefix="onnxft-bench-") as td:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            path = resolve(name, Path(td))
            if path is None:
                continue
            r = ft.bench(path, ber=args.ber, batch=args.batch, provider=args.provider, repeats=args.repeats,
                         seed=args.seed, threads=args.threads)
            r["model"] = name
            r["path"] = path if name not in PRESETS else f"<built {name}>"
            rows.append(r)
            print(fmt_row([name, r["sites"], r["batch"], f"{r['ber']:.0e}", f"{r['clean_ms']:.1f}",
                           f"{r['injected_ms']:.1f}", f"{r['ratio']:.2f}", f"{r['faults_per_run']:.2f}"]),
                  flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.json, json.dumps(rows, indent=2) + "\n")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
