"""A deterministic stand-in for a campaign runner (store and worker tests): a unit's result is a
function of the unit alone, drawn from its own random stream like a real campaign unit."""
import os
import time
from pathlib import Path

import numpy as np


class ToyRunner:
    def __init__(self, payload):
        self.payload = payload  # {"sleep": s, "die_on": key or None, "marker": path or None}
        self.pid = os.getpid()

    def run(self, unit):
        p = self.payload
        if p.get("die_on") == unit.key and p.get("marker") and not Path(p["marker"]).exists():
            Path(p["marker"]).write_text(str(os.getpid()))  # die once, mid-unit
            os._exit(1)
        time.sleep(p.get("sleep", 0.0))
        rng = np.random.default_rng([p.get("seed", 0), unit.trial, unit.batch, int(unit.ber * 1e12)])
        ok = int(rng.integers(0, 100))
        return {"result": {"correct": ok, "sdc": 100 - ok, "items": 100}, "faults": int(rng.integers(0, 10))}
