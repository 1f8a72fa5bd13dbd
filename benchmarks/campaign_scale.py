"""Campaigns at scale: eval throughput with --workers 2 against 1, and the memory of a long campaign.

    python benchmarks/campaign_scale.py throughput [--verb eval|vuln] [--limit 512 --trials 2 --repeats 2]
    python benchmarks/campaign_scale.py memory [--units 3000]

throughput: the same campaign (sample ViT, BER 1e-7; ``--verb vuln``: layer and module factors,
``--trials`` trials, so that its rounds are trials then one batch set each) with 1 worker in process
and with 2 Ray workers, alternated ``--repeats`` times, wall clock of the whole command (Ray's start
included) and of the units alone (from the store's per-unit times); results.json must be identical
(vuln's less its ``seconds``, the command's wall time).

memory: a campaign of ``--units`` small units (batch 8) in one process, its resident set size read
from /proc every second, printed as a curve (units done, RSS MiB).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _command(verb: str, out: Path, limit: int, trials: int, workers: int, batch: int = 64) -> float:
    args = [sys.executable, "-m", "onnxft", verb, "vit", "--ber", "1e-7", "--limit", str(limit), "--trials",
            str(trials), "--batch", str(batch), "--quiet", "--out", str(out)]
    if verb == "vuln":
        args += ["-g", "layer,module", "--max-trials", str(trials)]
    if workers > 1:
        args += ["--workers", str(workers)]
    t0 = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    return time.perf_counter() - t0


def _results(out: Path) -> str:
    res = json.loads((out / "results.json").read_text())
    res.pop("seconds", None)  # (vuln: the command's wall time)
    return json.dumps(res, sort_keys=True)


def throughput(limit: int, trials: int, repeats: int, verb: str = "eval") -> None:
    from onnxft.campaigns.store import CampaignStore

    rows = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        digests = set()
        for r in range(repeats):
            for w in (1, 2) if r % 2 == 0 else (2, 1):
                out = Path(tmp) / f"w{w}r{r}"
                wall = _command(verb, out, limit, trials, w)
                store = CampaignStore(out, resume=True)
                units = store.rows()
                store.close()
                busy = sum(u["seconds"] for u in units)
                span = max(u["finished"] for u in units) - min(u["finished"] - u["seconds"] for u in units)
                rows[w].append((wall, span, busy, len(units)))
                digests.add(_results(out))
                print(f"workers {w}: {len(units)} units, command {wall:.1f} s, units span {span:.1f} s, "
                      f"unit time summed {busy:.1f} s", flush=True)
        print("results.json identical for every run:", len(digests) == 1)
    med = {w: sorted(v)[len(v) // 2] for w, v in rows.items()}
    print(f"median command time: 1 worker {med[1][0]:.1f} s, 2 workers {med[2][0]:.1f} s "
          f"(speed-up {med[1][0] / med[2][0]:.2f}); units alone: {med[1][1]:.1f} s vs {med[2][1]:.1f} s "
          f"(speed-up {med[1][1] / med[2][1]:.2f})")


def memory(units: int) -> None:
    trials = max(1, units // 25)  # 200 items at batch 8: 25 units per trial
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "onnxft", "eval", "vit", "--ber", "1e-8", "--limit", "200", "--trials",
                str(trials), "--batch", "8", "--quiet", "--out", tmp]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        curve = []
        store_path = Path(tmp) / "campaign.sqlite"

        def done() -> int:
            import sqlite3

            if not store_path.exists():
                return 0
            try:
                db = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True, timeout=1)
                n = db.execute("SELECT COUNT(*) FROM units").fetchone()[0]
                db.close()
                return n
            except sqlite3.Error:
                return -1

        t0 = time.time()
        while proc.poll() is None:
            try:
                rss = next(int(ln.split()[1]) for ln in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                           if ln.startswith("VmRSS"))
            except (OSError, StopIteration):
                break
            curve.append((round(time.time() - t0, 1), done(), rss / 1024))
            time.sleep(1.0)
        proc.wait()
    print(json.dumps({"units": trials * 25, "samples": len(curve)}))
    step = max(1, len(curve) // 20)
    for t, n, mib in curve[::step] + curve[-1:]:
        print(f"  t {t:6.1f} s   units {n:5d}   RSS {mib:7.1f} MiB")
    settled = [m for t, n, m in curve if n > trials * 25 * 0.1]
    if settled:
        print(f"RSS after the first 10% of units: min {min(settled):.1f} MiB, max {max(settled):.1f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["throughput", "memory"])
    ap.add_argument("--verb", choices=["eval", "vuln"], default="eval")
    ap.add_argument("--limit", type=int, default=512)
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--units", type=int, default=3000)
    a = ap.parse_args()
    if a.what == "throughput":
        throughput(a.limit, a.trials, a.repeats, a.verb)
    else:
        memory(a.units)


if __name__ == "__main__":
    main()
