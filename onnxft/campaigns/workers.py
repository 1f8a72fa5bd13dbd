"""Running a campaign's units: in this process, or on Ray workers (``--workers N``, ``--ray-address``).

A *runner* is a class built once per worker from a payload (the model's bytes, the data, the spec)
whose ``run(unit)`` returns the unit's result (plain JSON data) and ``faults`` (flips applied). The
driver (this process) hands out units, commits each result to the ``CampaignStore`` as it arrives,
and moves one progress bar. Units carry their own random streams, so results are identical for any
number of workers and any schedule.

With Ray, each worker is an actor holding one runner (one onnxruntime session, built once); the
payload travels once through Ray's object store. A worker that dies mid-unit is restarted and the
unit retried (``max_restarts``, ``max_task_retries``); the store's primary key guarantees a unit is
stored once. Intra-op threads per worker default to ``cores // workers`` (at least 1), so that
workers x threads <= cores. Ray is an optional extra (``pip install "onnxft[ray]"``).
"""
from __future__ import annotations

import os
import time
from typing import Callable, Iterable

from .store import CampaignStore, Unit

RAY_HINT = 'more than one worker needs Ray: pip install "onnxft[ray]" (or pip install ray)'
RETRIES = 3


class CampaignInterrupted(RuntimeError):
    """Ctrl-C during a campaign: what is committed stays; ``--resume DIR`` continues."""


def threads_per_worker(workers: int, threads: int | None = None) -> int:
    """``threads`` if given, else the cores shared evenly: workers x threads <= cores."""
    if threads:
        return int(threads)
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def run_units(units: Iterable[Unit], runner_factory: Callable, payload, store: CampaignStore | None = None,
              workers: int = 1, ray_address: str | None = None, progress: Callable | None = None) -> dict[str, dict]:
    """Run every unit not yet in ``store``; return key -> result for all units (stored ones included).

    ``runner_factory(payload)`` builds a runner; with Ray it is called inside each worker, so it and
    the payload must be picklable (a module-level class and plain data)."""
    units = list(units)
    results = store.done() if store is not None else {}
    todo = [u for u in units if u.key not in results]
    total, done = len(units), len(units) - len(todo)
    if progress:
        progress(done, total)

    def commit(unit, out, seconds, worker):
        nonlocal done
        results[unit.key] = out["result"]
        if store is not None:
            store.record(unit, out["result"], out.get("faults", 0), seconds, worker)
        done += 1
        if progress:
            progress(done, total)

    try:
        if workers <= 1 and ray_address is None:
            runner = runner_factory(payload)
            for unit in todo:
                t0 = time.perf_counter()
                commit(unit, runner.run(unit), time.perf_counter() - t0, None)
        else:
            _run_on_ray(todo, runner_factory, payload, workers, ray_address, commit)
    except KeyboardInterrupt:
        raise CampaignInterrupted(f"interrupted: {done} of {total} units done"
                                  + (f"; continue with --resume {store.dir}" if store is not None else "")) from None
    return results


class _Actor:
    """One Ray worker: a runner built once from the payload."""

    def __init__(self, runner_factory, boxed_payload):
        import socket

        import ray

        # The payload comes boxed ([ref]) so that Ray hands the reference over instead of resolving
        # it as a constructor argument; a restarted worker fetches it again from the object store.
        self.runner = runner_factory(ray.get(boxed_payload[0]))
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    def run(self, unit: Unit):
        t0 = time.perf_counter()
        out = self.runner.run(unit)
        return out, time.perf_counter() - t0, self.name


def _run_on_ray(todo: list[Unit], runner_factory, payload, workers: int, address: str | None, commit) -> None:
    try:
        import ray
    except ImportError:
        raise RuntimeError(RAY_HINT) from None
    started_here = not ray.is_initialized()
    if started_here:
        import logging

        kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=workers, **kwargs)
    try:
        payload_ref = ray.put(payload)  # one copy in the object store, read by every worker
        actor_cls = ray.remote(num_cpus=1, max_restarts=RETRIES, max_task_retries=RETRIES)(_Actor)
        actors = [actor_cls.remote(runner_factory, [payload_ref]) for _ in range(max(1, workers))]
        queue = list(reversed(todo))
        pending = {}
        for actor in actors:  # two units in flight per worker: the next one is queued while one runs
            for _ in range(2):
                if queue:
                    unit = queue.pop()
                    pending[actor.run.remote(unit)] = (unit, actor)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            unit, actor = pending.pop(ready[0])
            out, seconds, worker = ray.get(ready[0])
            commit(unit, out, seconds, worker)
            if queue:
                nxt = queue.pop()
                pending[actor.run.remote(nxt)] = (nxt, actor)
        del payload_ref
    finally:
        if started_here:
            ray.shutdown()
