"""Short soak (the long form is `claimwatch bench soak --minutes 20 --rate 2000`)."""

from __future__ import annotations

from replay.soak import soak


def test_short_soak_keeps_up_and_memory_bounded(isolated, tmp_path):
    s = isolated.model_copy(update={"kafka_url": None, "redis_url": None})  # its own embedded stack
    rep = soak(s, seconds=40, rate=1000, cards=20_000, log=lambda m: None)
    assert rep["worker_alive"]
    assert rep["processed"] >= rep["sent"], rep["end"]  # kept up: everything offered was processed
    assert rep["end"]["lag"] == 0
    # the worker's memory does not grow with the stream (bounded batches, no per-event retention)
    assert rep["end"]["worker_rss_mb"] < rep["start"]["worker_rss_mb"] * 1.5 + 40, rep["samples"]
