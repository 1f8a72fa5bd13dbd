"""eval campaigns in the store: SIGKILL and --resume, a spec mismatch, --workers 2 against 1."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxft.campaigns.store import STORE_NAME, CampaignStore
from tests.models import default_sigint, labelled_data, run_cli, tiny_transformer

ARGS = ["--ber", "0,1e-6,1e-5", "--trials", "3", "--batch", "4", "--quiet", "--threads", "1"]


@pytest.fixture(scope="module")

def model_and_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("campaign")
    model = tiny_transformer()
    onnx.save(model, d / "m.onnx")
    x, y = labelled_data(model, n=32)
    np.savez(d / "d.npz", x=x, y=y)
    return str(d / "m.onnx"), str(d / "d.npz")


def _keys(out: Path) -> list[str]:
    store = CampaignStore(out, resume=True)
    try:
        return [r["key"] for r in store.rows()]
    finally:
        store.close()


def _signal_midway(args: list, out: Path, sig: int, units: int = 10, **popen) -> subprocess.Popen:
    """Start ``onnxft ARGS --out OUT`` in a child process and send it ``sig`` once its store holds
    ``units`` units (or after 120 s); returns the process (stdout/stderr discarded unless ``popen``
    says otherwise)."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    popen = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, **popen}
    proc = subprocess.Popen([sys.executable, "-m", "onnxft", *args, "--out", str(out)], env=env, **popen)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
        if (out / STORE_NAME).exists():
            try:
                if len(_keys(out)) >= units:
                    break
            except Exception:  # the store is being created
                continue
    proc.send_signal(sig)
    return proc


def test_sigkill_midway_and_resume_equals_an_uninterrupted_run(model_and_data, tmp_path, capsys):
    model, data = model_and_data
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run_cli(["eval", model, "--data", data, *ARGS, "--out", str(whole)], capsys)[0] == 0
    units = 3 * 8 * 3  # trials x batches x BERs
    assert len(_keys(whole)) == units
    proc = _signal_midway(["eval", model, "--data", data, *ARGS], killed, signal.SIGKILL)
    proc.wait()
    before = len(_keys(killed))
    assert 10 <= before < units, "the campaign must be killed midway"
    assert not (killed / "results.json").exists()
    assert run_cli(["eval", model, "--data", data, *ARGS, "--resume", str(killed)], capsys)[0] == 0
    keys = _keys(killed)
    assert len(keys) == len(set(keys)) == units  # every unit exactly once
    assert (killed / "results.json").read_bytes() == (whole / "results.json").read_bytes()


def test_resume_refuses_other_options_in_one_line(model_and_data, tmp_path, capsys):
    model, data = model_and_data
    out = tmp_path / "c"
    assert run_cli(["eval", model, "--data", data, *ARGS, "--out", str(out)], capsys)[0] == 0
    other = [a if a != "3" else "4" for a in ARGS]  # --trials 4
    code, _, err = run_cli(["eval", model, "--data", data, *other, "--resume", str(out)], capsys)
    assert code == 1 and err.count("\n") == 1 and "differs in: trials" in err
    code, _, err = run_cli(["eval", model, "--data", data, *ARGS, "--resume", str(tmp_path / "none")], capsys)
    assert code == 1 and "no campaign there" in err


def test_two_workers_give_the_results_of_one(model_and_data, tmp_path, capsys):
    pytest.importorskip("ray")
    model, data = model_and_data
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--ber", "1e-6,1e-5", "--trials", "2", "--batch", "8", "--quiet"]
    assert run_cli(["eval", model, "--data", data, *args, "--out", str(one)], capsys)[0] == 0
    assert run_cli(["eval", model, "--data", data, *args, "--out", str(two), "--workers", "2"], capsys)[0] == 0
    assert (one / "results.json").read_bytes() == (two / "results.json").read_bytes()
    store = CampaignStore(two, resume=True)
    workers = {r["worker"] for r in store.rows()}
    store.close()
    assert len(workers) == 2


def test_compare_resumes_per_scheme(model_and_data, tmp_path, capsys):
    """compare stores each scheme as a part: a resumed compare runs only the missing units and
    writes the uninterrupted compare.json."""
    import json

    model, data = model_and_data
    args = ["compare", model, "--data", data, "--schemes", "none,lb", "--ber", "1e-6,1e-5", "--trials", "2",
            "--batch", "8", "--calib", data, "--precision", "fp32"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run_cli([*args, "--out", str(whole)], capsys)[0] == 0
    assert run_cli([*args, "--out", str(cut)], capsys)[0] == 0
    store = CampaignStore(cut, resume=True)  # forget some units, as a kill would
    keys = [r["key"] for r in store.rows()]
    assert len(keys) == 2 * 2 * 4 * 2  # schemes x BERs x batches x trials
    store.db.execute("DELETE FROM units WHERE trial = 1")
    store.close()
    assert run_cli([*args, "--resume", str(cut)], capsys)[0] == 0
    a, b = (json.loads((d / "compare.json").read_text()) for d in (whole, cut))
    assert a == b
    assert len(_keys(cut)) == len(keys)


def test_ctrl_c_stops_cleanly_and_the_campaign_resumes(model_and_data, tmp_path, capsys):
    """SIGINT (Ctrl-C) midway: one line saying how to go on, no traceback, no results.json, a
    consistent store; resumed, the uninterrupted results."""
    import sqlite3

    model, data = model_and_data
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run_cli(["eval", model, "--data", data, *ARGS, "--out", str(whole)], capsys)[0] == 0
    units = 3 * 8 * 3
    proc = _signal_midway(["eval", model, "--data", data, *ARGS], cut, signal.SIGINT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    _, err = proc.communicate(timeout=60)
    before = len(_keys(cut))
    assert 10 <= before < units, "the campaign must be interrupted midway"
    assert proc.returncode == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"onnxft: error: interrupted: {before} of {units} units done; "
                                            f"continue with --resume {cut}")
    assert not (cut / "results.json").exists()
    db = sqlite3.connect(cut / STORE_NAME)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()
    assert run_cli(["eval", model, "--data", data, *ARGS, "--resume", str(cut)], capsys)[0] == 0
    keys = _keys(cut)
    assert len(keys) == len(set(keys)) == units
    assert (cut / "results.json").read_bytes() == (whole / "results.json").read_bytes()



def test_two_model_eval_killed_in_its_first_model_resumes(model_and_data, tmp_path, capsys):
    """Every model's part is declared before any work, so a campaign killed before it reached its
    second model resumes (it used to stop with "'m2.onnx' is not part of the campaign there"), and
    a resume with another model list is refused in one line."""
    model, data = model_and_data
    second = str(tmp_path / "m2.onnx")
    onnx.save(tiny_transformer(seed=3), second)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run_cli(["eval", model, second, "--data", data, *ARGS, "--out", str(whole)], capsys)[0] == 0
    per_model = 3 * 8 * 3
    assert len(_keys(whole)) == 2 * per_model
    proc = _signal_midway(["eval", model, second, "--data", data, *ARGS], killed, signal.SIGKILL)
    proc.wait()
    assert 10 <= len(_keys(killed)) < per_model, "the campaign must be killed inside its first model"
    assert run_cli(["eval", model, second, "--data", data, *ARGS, "--resume", str(killed)], capsys)[0] == 0
    keys = _keys(killed)
    assert len(keys) == len(set(keys)) == 2 * per_model
    assert (killed / "results.json").read_bytes() == (whole / "results.json").read_bytes()
    code, _, err = run_cli(["eval", model, "--data", data, *ARGS, "--resume", str(killed)], capsys)
    assert code == 1 and err.count("\n") == 1 and "ran m.onnx, m2.onnx, not m.onnx" in err
