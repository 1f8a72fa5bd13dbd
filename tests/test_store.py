"""The campaign store and the unit runners: resume after SIGKILL, spec mismatch, Ray workers."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from onnxft.campaigns.store import STORE_NAME, CampaignStore, StoreError, Unit
from onnxft.campaigns.workers import RAY_HINT, UnitPool, run_units, threads_per_worker
from tests.toy_runner import ToyRunner

SPEC = {"model": "toy", "bers": [1e-8, 1e-7], "trials": 3, "seed": 0}
UNITS = [Unit("toy", "none", b, t, j) for t in range(3) for j in range(4) for b in (1e-8, 1e-7)]


def _summary(results: dict) -> str:
    return json.dumps({k: results[k] for k in sorted(results)}, sort_keys=True)


def _open(path, spec=SPEC, resume=False, kind="eval", part="toy"):
    store = CampaignStore(path, resume)
    store.register(part, kind, spec)
    return store


def test_local_run_commits_every_unit_once(tmp_path):
    with _open(tmp_path) as store:
        first = run_units(UNITS, ToyRunner, {}, store)
        keys = [r["key"] for r in store.rows()]
    assert len(keys) == len(UNITS) == len(set(keys))
    with _open(tmp_path, resume=True) as store:
        calls = []
        again = run_units(UNITS, ToyRunner, {}, store, progress=lambda d, t: calls.append((d, t)))
    assert _summary(again) == _summary(first)
    assert calls == [(len(UNITS), len(UNITS))]  # nothing left to run


def test_resume_refuses_another_spec_and_a_missing_store(tmp_path):
    _open(tmp_path).close()
    with pytest.raises(StoreError, match=r"differs in: trials"):
        _open(tmp_path, dict(SPEC, trials=4), resume=True)
    with pytest.raises(StoreError, match="not 'compare'"):
        _open(tmp_path, kind="compare", resume=True)
    with pytest.raises(StoreError, match="not part of the campaign"):
        _open(tmp_path, resume=True, part="other")
    with pytest.raises(StoreError, match="no campaign there"):
        _open(tmp_path / "empty", resume=True)
    _open(tmp_path, dict(SPEC, threads=7), resume=True).close()  # threads change no result


def test_a_new_campaign_replaces_the_old_store(tmp_path):
    with _open(tmp_path) as store:
        run_units(UNITS[:3], ToyRunner, {}, store)
    with _open(tmp_path) as store:
        assert store.done() == {}


def test_store_never_holds_a_unit_twice(tmp_path):
    import sqlite3

    with _open(tmp_path) as store:
        store.record(UNITS[0], {"correct": 1})
        with pytest.raises(sqlite3.IntegrityError):
            store.record(UNITS[0], {"correct": 1})


def test_a_pool_runs_its_rounds_on_one_runner(tmp_path):
    """A campaign that decides its next units from the last ones (vuln, Algorithm 1) runs rounds on
    one UnitPool: one runner for all of them, units done in an earlier round come back without
    running, and progress counts the units of every round so far."""
    built, calls = [], []

    def factory(payload):
        built.append(payload)
        return ToyRunner(payload)

    with _open(tmp_path) as store:
        with UnitPool(factory, {}, store, progress=lambda d, t: calls.append((d, t))) as pool:
            first = pool.run(UNITS[:6])
            second = pool.run(UNITS[4:10])
        assert len(store.rows()) == 10
    assert len(built) == 1
    assert list(first) == [u.key for u in UNITS[:6]] and list(second) == [u.key for u in UNITS[4:10]]
    assert {k: first[k] for k in list(first)[4:]} == {k: second[k] for k in list(second)[:2]}
    assert calls[6] == (6, 6) and calls[7] == (8, 12) and calls[-1] == (12, 12)


_KILLABLE = """
import sys
from onnxft.campaigns.store import CampaignStore, Unit
from onnxft.campaigns.workers import run_units
from tests.toy_runner import ToyRunner
units = [Unit("toy", "none", b, t, j) for t in range(3) for j in range(4) for b in (1e-8, 1e-7)]
spec = {"model": "toy", "bers": [1e-8, 1e-7], "trials": 3, "seed": 0}
with CampaignStore(sys.argv[1], resume=len(sys.argv) > 2) as store:
    store.register("toy", "eval", spec)
    run_units(units, ToyRunner, {"sleep": 0.15}, store)  # 3.6 s: room to kill it midway on a busy machine
"""


def test_sigkill_midway_then_resume_gives_the_uninterrupted_results(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    with _open(whole) as store:
        expected = _summary(run_units(UNITS, ToyRunner, {"sleep": 0.0}, store))
    script = tmp_path / "campaign.py"
    script.write_text(_KILLABLE)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, str(script), str(killed)], env=env)
    deadline = time.time() + 60
    while time.time() < deadline:  # kill it once some, not all, units are committed
        time.sleep(0.05)
        if (killed / STORE_NAME).exists():
            with _open(killed, resume=True) as peek:
                if len(peek.done()) >= 5:
                    break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with _open(killed, resume=True) as store:
        before = len(store.done())
        assert 5 <= before < len(UNITS)
        resumed = _summary(run_units(UNITS, ToyRunner, {}, store))
        keys = [r["key"] for r in store.rows()]
    assert resumed == expected
    assert len(keys) == len(set(keys)) == len(UNITS)  # every unit exactly once


def test_threads_per_worker():
    assert threads_per_worker(1, 3) == 3
    assert 1 <= threads_per_worker(64) <= max(1, (os.cpu_count() or 1) // 64) or threads_per_worker(64) == 1


ray = pytest.importorskip("ray", reason=RAY_HINT)


@pytest.fixture(scope="module")
def ray_cluster():
    here = str(Path(__file__).resolve().parents[1])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": here}})
    yield
    ray.shutdown()


def test_two_ray_workers_equal_one(ray_cluster, tmp_path):
    with _open(tmp_path / "one") as store:
        one = run_units(UNITS, ToyRunner, {}, store)
    with _open(tmp_path / "two") as store:
        two = run_units(UNITS, ToyRunner, {}, store, workers=2)
        workers = {r["worker"] for r in store.rows()}
    assert _summary(two) == _summary(one)
    assert len(workers) == 2  # both workers took units


def test_a_worker_killed_mid_unit_is_retried(ray_cluster, tmp_path):
    marker = tmp_path / "died"
    with _open(tmp_path / "ref") as store:
        ref = run_units(UNITS, ToyRunner, {}, store)
    with _open(tmp_path / "kill") as store:
        got = run_units(UNITS, ToyRunner, {"die_on": UNITS[4].key, "marker": str(marker)}, store, workers=2)
        keys = [r["key"] for r in store.rows()]
    assert marker.exists()  # a worker really died in the middle of that unit
    assert _summary(got) == _summary(ref)
    assert len(keys) == len(set(keys)) == len(UNITS)
