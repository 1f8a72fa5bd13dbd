"""vuln campaigns in the store: SIGKILL midway and --resume (the BER search and the adaptive trials
make the same decisions), a spec mismatch, --workers 2 against 1."""
import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxft.campaigns.store import CampaignStore
from onnxft.cli.main import main
from tests.models import default_sigint, labelled_data, tiny_cnn

# both parts (network: layers and bits; input: patches), a BER search, and trials added until the
# intervals are narrow enough (1 at least, 3 at most): every kind of decision vuln makes
ARGS = ["-g", "layer,bit,patch", "--target-loss", "0.2", "--batch", "8", "--trials", "1", "--max-trials", "3",
        "--ci-width", "0.05", "--patch", "4", "--threads", "1"]

# The CLI in a child process that sends itself a signal once `at` units are committed (from the
# progress callback, so the point is exact): SIGKILL, as hard as an external kill, or SIGINT (Ctrl-C).
_KILLED_AT = """
import os, signal, sys
from onnxft.cli.main import main
verb = sys.modules["onnxft.cli.vuln"]
at, sig = int(sys.argv[1]), getattr(signal, sys.argv[2])
def killer(bars, label):
    def progress(done, total):
        if done >= at:
            os.kill(os.getpid(), sig)
    return progress
verb._progress = killer
main(sys.argv[3:])
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("vuln_resume")
    model = tiny_cnn()
    onnx.save(model, d / "m.onnx")
    x, y = labelled_data(model, n=48)
    np.savez(d / "d.npz", x=x, y=y)
    return str(d / "m.onnx"), str(d / "d.npz")


@pytest.fixture(scope="module")
def whole(files, tmp_path_factory):
    """The uninterrupted campaign: its folder, results (less the wall time) and unit keys."""
    model, data = files
    out = tmp_path_factory.mktemp("whole")
    code, _, err = _cli(["vuln", model, "--data", data, *ARGS, "--quiet", "--out", str(out)])
    assert code == 0, err
    return out, _results(out), _keys(out)


def _cli(argv):
    """``onnxft ARGV`` in this process: (exit status, stdout, stderr) (as ``run_cli``, for module fixtures too)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, out.getvalue(), err.getvalue()


def _results(out: Path) -> dict:
    res = json.loads((out / "results.json").read_text())
    res.pop("seconds")  # the wall time of the command: the one field that is not a result
    return res


def _keys(out: Path) -> list[str]:
    with CampaignStore(out, resume=True) as store:
        return [r["key"] for r in store.rows()]


@pytest.mark.parametrize("at,sig", [(40, "SIGKILL"),  # in the network part's BER search
                                    (105, "SIGKILL"),  # in its adaptive trials (the 2nd of 3)
                                    (200, "SIGKILL"),  # in the input part's BER search
                                    (105, "SIGINT")])  # Ctrl-C: one line, no traceback
def test_killed_midway_and_resumed_equals_an_uninterrupted_run(files, whole, tmp_path, at, sig):
    model, data = files
    ref_dir, ref, ref_keys = whole
    assert len(ref_keys) > 200 and max(r["trials"] for r in ref["runs"]) > 1  # trials were added
    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _KILLED_AT, str(at), sig, "vuln", model, "--data", data, *ARGS,
                           "--out", str(killed)], env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=default_sigint)
    if sig == "SIGKILL":
        assert proc.returncode == -9, proc.stderr[-2000:]
    else:
        last = proc.stderr.strip().splitlines()[-1]  # (of the units known so far: the search and trials go on)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert re.fullmatch(rf"onnxft: error: interrupted: {at} of \d+ units done; continue with --resume {killed}",
                            last), last
    assert len(_keys(killed)) == at and not (killed / "results.json").exists()
    code, _, err = _cli(["vuln", model, "--data", data, *ARGS, "--quiet", "--resume", str(killed)])
    assert code == 0, err
    keys = _keys(killed)
    assert len(keys) == len(set(keys))  # every unit exactly once...
    assert sorted(keys) == sorted(ref_keys)  # ...and the same units: the same search steps and trial counts
    assert _results(killed) == ref
    assert (killed / "results.csv").read_bytes() == (ref_dir / "results.csv").read_bytes()


def test_resume_refuses_other_options_and_another_kind_of_campaign(files, whole, tmp_path):
    model, data = files
    ref_dir = whole[0]
    other = [a if a != "0.05" else "0.1" for a in ARGS]  # --ci-width 0.1
    code, _, err = _cli(["vuln", model, "--data", data, *other, "--resume", str(ref_dir)])
    assert code == 1 and err.count("\n") == 1 and "differs in: ci_width" in err
    ev = tmp_path / "eval"
    assert _cli(["eval", model, "--data", data, "--ber", "1e-3", "--trials", "1", "--quiet", "--out", str(ev)])[0] == 0
    code, _, err = _cli(["vuln", model, "--data", data, *ARGS, "--resume", str(ev)])
    assert code == 1 and err.count("\n") == 1 and "is 'eval', not 'vuln'" in err
    # a finished campaign resumed runs nothing and writes the same results
    before = _keys(ref_dir)
    assert _cli(["vuln", model, "--data", data, *ARGS, "--quiet", "--resume", str(ref_dir)])[0] == 0
    assert _keys(ref_dir) == before and _results(ref_dir) == whole[1]


def test_two_workers_give_the_results_of_one(files, whole, tmp_path):
    pytest.importorskip("ray")
    model, data = files
    two = tmp_path / "two"
    code, _, err = _cli(["vuln", model, "--data", data, *ARGS, "--quiet", "--out", str(two), "--workers", "2"])
    assert code == 0, err
    assert _results(two) == whole[1]
    assert sorted(_keys(two)) == sorted(whole[2])
    with CampaignStore(two, resume=True) as store:
        assert len({r["worker"] for r in store.rows()}) == 2  # both workers took units
