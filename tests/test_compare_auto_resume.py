"""compare's ``auto`` (Algorithm 1) in compare's store: killed inside Algorithm 1 or after it, a
resumed compare measures only the units the store lacks and writes the uninterrupted compare.json;
other Algorithm 1 options are refused before any work; --workers 2 gives the results of one."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxft.campaigns import select
from onnxft.campaigns.store import CampaignStore
from tests.models import default_sigint, labelled_data, run_cli, tiny_transformer

# BER 1e-5 takes the tiny model below its target, so Algorithm 1 takes steps (tests/test_select.py)
ARGS = ["--schemes", "lb,auto", "--ber", "1e-5", "--trials", "1", "--batch", "100", "--precision", "fp32",
        "--provider", "cpu", "--max-overhead", "0.15", "--threads", "1"]

# The CLI in a child process that sends itself a signal once `at` units are committed (counted
# where the store commits them, so the point is exact): SIGKILL, as hard as an external kill, or
# SIGINT (Ctrl-C).
_KILLED_AT = """
import os, signal, sys
from onnxft.campaigns.store import CampaignStore
from onnxft.cli.main import main
at, sig = int(sys.argv[1]), getattr(signal, sys.argv[2])
record, committed = CampaignStore.record, []
def record_then_kill(self, unit, *args, **kwargs):
    record(self, unit, *args, **kwargs)
    committed.append(unit.key)
    if len(committed) >= at:
        os.kill(os.getpid(), sig)
CampaignStore.record = record_then_kill
main(sys.argv[3:])
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("compare_auto")
    model = tiny_transformer(seed=5)
    onnx.save(model, d / "m.onnx")
    x, y = labelled_data(model, n=400, seed=2)
    np.savez(d / "d.npz", x=x, y=y)
    return str(d / "m.onnx"), str(d / "d.npz")


def _args(files, *extra):
    model, data = files
    return ["compare", model, "--data", data, "--calib", data, *ARGS, *extra]


def _keys(out: Path) -> list[str]:
    with CampaignStore(out, resume=True) as store:
        return [r["key"] for r in store.rows()]


def _select_keys(keys: list[str]) -> list[str]:
    return [k for k in keys if k.split("|")[1].startswith("select/")]


@pytest.fixture(scope="module")
def whole(files, tmp_path_factory):
    """The uninterrupted compare: its folder, compare.json and unit keys."""
    import contextlib
    import io

    from onnxft.cli.main import main

    out = tmp_path_factory.mktemp("whole")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err, \
            pytest.raises(SystemExit) as exc:
        main([*_args(files), "--out", str(out)])
    assert exc.value.code == 0, err.getvalue()
    return out, json.loads((out / "compare.json").read_text()), _keys(out)


@pytest.fixture
def measured(monkeypatch):
    """The keys of the Algorithm 1 units this process measures (not those it finds stored)."""
    keys = []
    run = select.SelectSetup.run

    def counting(self, unit):
        keys.append(unit.key)
        return run(self, unit)

    monkeypatch.setattr(select.SelectSetup, "run", counting)
    return keys


def test_auto_commits_algorithm1_to_compare_store(whole):
    _, ref, keys = whole
    sel_keys = _select_keys(keys)
    kinds = {k.split("|")[1].split(":")[0] for k in sel_keys}
    assert kinds == {"select/layers", "select/gemms", "select/without"}
    auto = next(s for s in ref["schemes"] if s["scheme"] == "auto")["info"]
    assert auto["reached"] and auto["chosen"]  # Algorithm 1 took steps: something to interrupt
    assert len(sel_keys) >= 12 and len(keys) - len(sel_keys) == 2 * 4  # (schemes x batches)


@pytest.mark.parametrize("at,sig", [(6, "SIGKILL"),  # inside Algorithm 1 (its GEMM factors)
                                    (10, "SIGINT"),  # Ctrl-C inside Algorithm 1: one line, no traceback
                                    (-2, "SIGKILL")])  # after Algorithm 1, in lb's evaluation (auto's not begun)
def test_killed_and_resumed_equals_an_uninterrupted_compare(files, whole, measured, tmp_path, capsys, at, sig):
    _, ref, ref_keys = whole
    n_select = len(_select_keys(ref_keys))
    at = n_select + 2 if at < 0 else at
    assert at < n_select or at < len(ref_keys) - 4
    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _KILLED_AT, str(at), sig, *_args(files), "--out", str(killed)],
                          env=env, capture_output=True, text=True, timeout=120, preexec_fn=default_sigint)
    if sig == "SIGKILL":
        assert proc.returncode == -9, proc.stderr[-2000:]
    else:
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert re.fullmatch(rf"onnxft: error: interrupted: {at} of \d+ units done; continue with --resume {killed}",
                            last), last
    before = _keys(killed)
    assert len(before) == at and not (killed / "compare.json").exists()
    code, _, err = run_cli([*_args(files), "--resume", str(killed)], capsys)
    assert code == 0, err
    keys = _keys(killed)
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(ref_keys)  # the same units, each once
    # Algorithm 1 measured on resume exactly the units the store lacked
    assert sorted(measured) == sorted(set(_select_keys(ref_keys)) - set(before))
    assert json.loads((killed / "compare.json").read_text()) == ref


def test_finished_compare_resumed_measures_nothing(files, whole, measured, capsys):
    out, ref, keys = whole
    code, _, err = run_cli([*_args(files), "--resume", str(out)], capsys)
    assert code == 0, err
    assert measured == [] and _keys(out) == keys
    assert json.loads((out / "compare.json").read_text()) == ref


@pytest.mark.parametrize("option,value,field", [("--target-drop", "0.05", "target_drop"),
                                                ("--max-overhead", "0.3", "max_overhead"),
                                                ("--design-ber", "1e-6", "design_ber")])
def test_resume_with_other_select_options_is_refused_before_any_work(files, whole, measured, capsys,
                                                                     option, value, field):
    out, _, keys = whole
    args = _args(files)
    if option in args:
        args[args.index(option) + 1] = value
    else:
        args += [option, value]
    code, stdout, err = run_cli([*args, "--resume", str(out)], capsys)
    assert code == 1 and err.count("\n") == 1 and err.startswith("onnxft: error: ")
    assert f"differs in: {field}" in err and "Traceback" not in err
    assert measured == [] and _keys(out) == keys


def test_two_workers_give_the_selection_of_one(files, whole, tmp_path, capsys):
    pytest.importorskip("ray")
    _, ref, ref_keys = whole
    two = tmp_path / "two"
    code, _, err = run_cli([*_args(files), "--out", str(two), "--workers", "2"], capsys)
    assert code == 0, err
    assert json.loads((two / "compare.json").read_text()) == ref
    assert sorted(_keys(two)) == sorted(ref_keys)
    with CampaignStore(two, resume=True) as store:
        workers = {r["worker"] for r in store.rows() if r["scheme"].startswith("select/")}
    assert len(workers) == 2  # Algorithm 1's units ran on both workers


def test_api_twin_resumes_the_selection_from_the_store(files, whole, measured, tmp_path):
    """api.compare with a store (open_store) stores auto's Algorithm 1 as the CLI does: resumed, it
    measures nothing and returns the same schemes."""
    from onnxft import api

    model, data = files
    kw = dict(schemes=("auto",), bers=(1e-5,), data=data, calib=data, trials=1, batch=100, precision="fp32",
              provider="cpu", max_overhead=0.15, threads=1)
    with api.open_store(tmp_path / "api") as store:
        first = api.compare(model, store=store, **kw)
    n = len(measured)
    assert n == len(_select_keys(whole[2]))  # the CLI's Algorithm 1 units, each measured once
    with api.open_store(tmp_path / "api", resume=True) as store:
        again = api.compare(model, store=store, **kw)
    assert len(measured) == n and again["schemes"] == first["schemes"]
    auto = next(s for s in whole[1]["schemes"] if s["scheme"] == "auto")
    assert first["schemes"][0]["info"] == auto["info"]
