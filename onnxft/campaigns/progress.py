"""Progress callbacks of campaigns: ``progress(done, total)`` per faulty run, and, where the callback
has a ``phase`` method, ``progress.phase(text)`` for the steps before the first run (building the
injection graph and its sessions, the clean pass), which can take tens of seconds."""
from __future__ import annotations


def report_phase(progress, text: str) -> None:
    phase = getattr(progress, "phase", None)
    if phase is not None:
        phase(text)
