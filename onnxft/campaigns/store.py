"""The durable campaign store: one SQLite database in a campaign's ``--out DIR``.

A campaign (eval, compare, vuln) is a set of *units* of work, model/scheme x BER x trial x batch.
Every unit draws its faults from its own random stream (``trial_rng(seed, trial, batch)``), so its
result does not depend on which process ran it or when. The store keeps:

- ``meta``: the kind and spec (JSON, ``CampaignSpec.to_json``) of each part of the campaign (each
  model of an ``eval``), written once;
- ``units``: one row per finished unit (its key is the primary key, so no unit can be stored twice):
  the outcome counts as JSON, the number of flips, seconds, which worker ran it, when.

A row is committed as soon as its unit is done (WAL journal: a reader never blocks the writer, and
a killed process loses at most the unit it was computing). results.json, CSV and plots are views
computed from the rows. ``--resume DIR`` opens the store again: the spec must match the stored one
(else a one-line error naming the fields that differ; the thread count may change, it changes no
result), and only the missing units run. The unit
results are integer counts, summed in key order, so a resumed campaign's results.json is the
uninterrupted one's, byte for byte.
"""
from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from .spec import upgraded

STORE_NAME = "campaign.sqlite"
SCHEMA_VERSION = 1


class StoreError(ValueError):
    """A user-facing problem with a campaign store (resume without one, a spec mismatch)."""


@dataclass(frozen=True)
class Unit:
    """One unit of work. ``key`` is its identity in the store; the rest says what to compute."""

    model: str
    scheme: str
    ber: float
    trial: int
    batch: int

    @property
    def key(self) -> str:
        return f"{self.model}|{self.scheme}|{self.ber!r}|t{self.trial}|b{self.batch}"


def _canonical(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))


def _differences(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


# Spec fields that do not change any result: a campaign may resume with other values.
NEUTRAL_FIELDS = ("threads",)


class CampaignStore:
    """``DIR/campaign.sqlite``: ``resume=False`` starts a new campaign (an old store there is
    replaced: re-running a command means running it again); ``resume=True`` continues the stored one.

    A campaign has one or more *parts* (the models of one ``eval``, say), each registered with its
    kind and spec (``register``); on resume a part's spec must equal the stored one."""

    def __init__(self, out_dir: str | Path, resume: bool = False):
        self.dir = Path(out_dir)
        self.path = self.dir / STORE_NAME
        self.resume = resume
        self._expected: set[str] = set()  # parts declared by expect_parts (may register on resume)
        if resume and not self.path.is_file():
            raise StoreError(f"--resume {out_dir}: no campaign there (no {STORE_NAME})")
        self.dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            for suffix in ("", "-wal", "-shm"):
                p = Path(str(self.path) + suffix)
                if p.exists():
                    p.unlink()
        try:
            self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # durable across a killed process (not a power cut)
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self.db.execute("CREATE TABLE IF NOT EXISTS units (key TEXT PRIMARY KEY, model TEXT, scheme TEXT, "
                            "ber REAL, trial INTEGER, batch INTEGER, result TEXT NOT NULL, faults INTEGER, "
                            "seconds REAL, worker TEXT, finished REAL)")
            if not resume:
                self.db.executemany("INSERT INTO meta VALUES (?, ?)",
                                    [("version", str(SCHEMA_VERSION)), ("created", str(time.time()))])
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not a readable campaign store ({exc})") from None

    def expect_parts(self, parts: list[str]) -> None:
        """Declare, before any work, every part the campaign will register (the models of a
        multi-model ``eval``): a campaign killed before it reached its last part then resumes (the
        parts it never registered are expected ones), and a resume with other parts is refused. A
        store written before this existed keeps the stricter rule (only registered parts resume)."""
        row = self.db.execute("SELECT value FROM meta WHERE key = 'expected_parts'").fetchone()
        if row is None:
            if self.resume:
                return
            self.db.execute("INSERT INTO meta VALUES (?, ?)", ("expected_parts", json.dumps(sorted(parts))))
        elif json.loads(row[0]) != sorted(parts):
            raise StoreError(f"--resume {self.dir}: the campaign there ran {', '.join(json.loads(row[0]))}, "
                             f"not {', '.join(sorted(parts))}")
        self._expected = set(parts)

    def register(self, part: str, kind: str, spec: dict) -> None:
        """Record (new campaign) or check (resume) the kind and spec of one part of the campaign."""
        key = f"part:{part}"
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        spec = {k: v for k, v in spec.items() if k not in NEUTRAL_FIELDS}
        if row is None:
            if self.resume and part not in self._expected:
                raise StoreError(f"--resume {self.dir}: {part!r} is not part of the campaign there")
            self.db.execute("INSERT INTO meta VALUES (?, ?)", (key, _canonical({"kind": kind, "spec": spec})))
            return
        stored = json.loads(row[0])
        old = stored["spec"]
        stored["spec"] = upgraded(old)  # stored by an older onnxft: as it ran
        if stored["kind"] != kind:
            raise StoreError(f"--resume {self.dir}: that campaign is {stored['kind']!r}, not {kind!r}")
        if _canonical(stored["spec"]) != _canonical(spec):
            hint, with_flag = "", dict(spec.get("selection") or {}, fault_constants=True)
            if stored["spec"] != old and with_flag == stored["spec"]["selection"]:
                hint = ("; it was started before --fault-constants existed, when arithmetic on constants was "
                        "faulted: add --fault-constants to resume it")
            raise StoreError(f"--resume {self.dir}: the campaign there was started with other options "
                             f"(differs in: {', '.join(_differences(stored['spec'], spec))}){hint}")

    def done(self) -> dict[str, dict]:
        """Finished units: key -> stored result."""
        return {k: json.loads(r) for k, r in self.db.execute("SELECT key, result FROM units")}

    def record(self, unit: Unit, result: dict, faults: int = 0, seconds: float = 0.0, worker: str | None = None):
        """Commit one finished unit (raises if the unit is already stored: never computed twice silently)."""
        self.db.execute("INSERT INTO units VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (unit.key, unit.model, unit.scheme, unit.ber, unit.trial, unit.batch,
                         json.dumps(result, sort_keys=True), int(faults), float(seconds),
                         worker or f"{socket.gethostname()}:{os.getpid()}", time.time()))

    def rows(self) -> list[dict]:
        cur = self.db.execute("SELECT key, model, scheme, ber, trial, batch, result, faults, seconds, worker, finished "
                              "FROM units ORDER BY key")
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, r), result=json.loads(r[6])) for r in cur]

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
