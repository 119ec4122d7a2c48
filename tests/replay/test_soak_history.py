"""``replay.soak.history_start``: a long soak's generated city never runs into the future."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from itertools import islice

from replay.city import iter_live
from replay.soak import CHUNK_DAYS, history_start


def test_a_long_soak_stays_in_the_past():
    # 50,000 settlements of a 2,000-card city are years of its clock: far more than the 400 days a short
    # soak starts back, where a fixed start made every later settlement a dead letter (from the future)
    now = datetime.now(timezone(timedelta(hours=8)))
    start = history_start(2000, 5, 50_000, now=now)
    assert (now - start).days > 400
    last = list(islice(iter_live(2000, 5, start, days_per_chunk=CHUNK_DAYS), 50_000))[-1]
    assert datetime.fromisoformat(last["event_time"]) < now
    assert history_start(2000, 5, 1000, now=now) == (now - timedelta(days=400)).replace(
        hour=0, minute=0, second=0, microsecond=0)
