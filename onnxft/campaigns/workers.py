"""Running a campaign's units: in this process, or on Ray workers (``--workers N``, ``--ray-address``).

A *runner* is a class built once per worker from a payload (the model's bytes, the data, the spec)
whose ``run(unit)`` returns the unit's result (plain JSON data) and ``faults`` (flips applied). The
driver (this process) hands out units, commits each result to the ``CampaignStore`` as it arrives,
and moves one progress bar. Units carry their own random streams, so results are identical for any
number of workers and any schedule. A campaign whose next units depend on earlier results (vuln's
BER search and adaptive trials, Algorithm 1) runs them in rounds on one ``UnitPool``: the runners
(and Ray) are started once for all rounds.

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
    with UnitPool(runner_factory, payload, store, workers, ray_address, progress) as pool:
        return pool.run(units)


class UnitPool:
    """Runs units in rounds (``run``) on runners built once. A campaign whose next units depend on
    the results of earlier ones (vuln's adaptive trials and BER search, Algorithm 1) calls ``run``
    round after round on the same runners and store; its decisions are functions of the results
    ``run`` returns, so a resumed campaign (whose stored units come back without running) makes the
    same decisions. Ray (``workers`` > 1 or ``ray_address``) starts at the first round that has
    work and stops at ``close``. ``progress(done, total)`` counts the units of all rounds so far."""

    def __init__(self, runner_factory: Callable, payload, store: CampaignStore | None = None, workers: int = 1,
                 ray_address: str | None = None, progress: Callable | None = None):
        self.runner_factory, self.payload, self.store = runner_factory, payload, store
        self.workers, self.ray_address, self.progress = workers, ray_address, progress
        self.results: dict[str, dict] = store.done() if store is not None else {}
        self.done = self.total = 0
        self._keys: set[str] = set()  # every unit given to run(), for the interrupted count
        self._runner = None
        self._ray = None  # (ray module, actors, payload ref, whether Ray was started here)

    @property
    def on_ray(self) -> bool:
        return self.workers > 1 or self.ray_address is not None

    def run(self, units: Iterable[Unit]) -> dict[str, dict]:
        """Run the units not done yet; return key -> result for every unit of ``units``."""
        units = list(units)
        todo = [u for u in units if u.key not in self.results]
        self.total += len(units)
        self._keys.update(u.key for u in units)
        self.done += len(units) - len(todo)
        if self.progress:
            self.progress(self.done, self.total)
        try:
            if todo and not self.on_ray:
                if self._runner is None:
                    self._runner = self.runner_factory(self.payload)
                for unit in todo:
                    t0 = time.perf_counter()
                    self._commit(unit, self._runner.run(unit), time.perf_counter() - t0, None)
            elif todo:
                self._run_on_ray(todo)
        except KeyboardInterrupt:
            if self.store is None:
                raise CampaignInterrupted(f"interrupted: {self.done} of {self.total} units done") from None
            # what the store holds, not the in-memory count: the signal may land between the two
            stored = len(self._keys & self.store.done().keys())
            raise CampaignInterrupted(f"interrupted: {stored} of {self.total} units done; "
                                      f"continue with --resume {self.store.dir}") from None
        return {u.key: self.results[u.key] for u in units}

    def _commit(self, unit: Unit, out: dict, seconds: float, worker: str | None) -> None:
        self.results[unit.key] = out["result"]
        if self.store is not None:
            self.store.record(unit, out["result"], out.get("faults", 0), seconds, worker)
        self.done += 1
        if self.progress:
            self.progress(self.done, self.total)

    def _run_on_ray(self, todo: list[Unit]) -> None:
        if self._ray is None:
            self._ray = _start_ray(self.runner_factory, self.payload, self.workers, self.ray_address)
        ray, actors = self._ray[0], self._ray[1]
        queue = list(reversed(todo))
        pending = {}
        # two units in flight per worker (the next one is queued while one runs), dealt round-robin so
        # that a round of few units (vuln's trials, a BER search step) spreads over the workers
        for _ in range(2):
            for actor in actors:
                if queue:
                    unit = queue.pop()
                    pending[actor.run.remote(unit)] = (unit, actor)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            unit, actor = pending.pop(ready[0])
            out, seconds, worker = ray.get(ready[0])
            self._commit(unit, out, seconds, worker)
            if queue:
                nxt = queue.pop()
                pending[actor.run.remote(nxt)] = (nxt, actor)

    def close(self) -> None:
        if self._ray is not None:
            ray, started_here = self._ray[0], self._ray[3]
            self._ray = None
            if started_here:
                ray.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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


def _start_ray(runner_factory, payload, workers: int, address: str | None):
    """(ray, actors, payload ref, whether Ray was started here): ``workers`` actors, each holding a
    runner built from the payload (put once into Ray's object store)."""
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
    payload_ref = ray.put(payload)  # one copy in the object store, read by every worker
    actor_cls = ray.remote(num_cpus=1, max_restarts=RETRIES, max_task_retries=RETRIES)(_Actor)
    actors = [actor_cls.remote(runner_factory, [payload_ref]) for _ in range(max(1, workers))]
    return ray, actors, payload_ref, started_here
