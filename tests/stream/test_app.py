"""The worker process's own settings (``stream.app``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: parse three 5,000-settlement batches and keep them alive (fetched, prepared, in Redis: what the worker
#: holds at full speed) with the worker's collector settings; print how many collections ran meanwhile
_PROBE = r"""
import gc, sys
sys.path.insert(0, sys.argv[1])
from replay.city import generate_day_fast
from stream.app import GC_THRESHOLDS, tune_gc
from stream.events import parse_event
lines = list(generate_day_fast(15_000, 3))
tune_gc()
if len(sys.argv) > 2:
    gc.set_threshold(int(sys.argv[2]), *GC_THRESHOLDS[1:])
runs = []
gc.callbacks.append(lambda phase, info: phase == "stop" and runs.append(info["generation"]))
alive = [[parse_event(x, future_tolerance_s=1e10) for x in lines[i:i + 5000]] for i in range(0, 15_000, 5000)]
print(len(runs))
"""


def _collections(*threshold: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, str(ROOT), *threshold], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


def test_the_collector_does_not_run_over_the_batches_a_worker_holds():
    # each collection would scan every object of the batches in flight, only to find them alive
    # (measured: 8 % of the worker's CPU, pauses up to 317 ms, with a young generation of 50,000)
    assert _collections() == 0
    assert _collections("50000") >= 1  # the probe does allocate enough to make a smaller threshold collect
