"""Benchmarks: commands that print numbers (never timed tests).

* ``quality`` — replays a generated city through the real pipeline (broker, worker processes,
  Redis, store) and scores the alerts against the generator's labels.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from alerts.model import to_dict
from claimwatch.settings import Settings


def machine() -> dict[str, Any]:
    import os

    return {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "date": datetime.now(timezone.utc).date().isoformat()}


def quality(settings: Settings, *, cards: int, days: int, seed: int, workers: int = 1, progress=None,
            ml: bool = True) -> dict[str, Any]:
    from replay import city
    from replay.quality import evaluate
    from replay.runner import replay_file

    with tempfile.TemporaryDirectory(prefix="cw-quality-") as d:
        path = Path(d) / "city.jsonl.gz"
        t0 = time.perf_counter()
        events, labels = city.generate(cards=cards, days=days, seed=seed)
        city.write(events, None, path)
        gen_s = time.perf_counter() - t0
        del events
        run_id = f"quality-{seed}-{int(time.time())}"
        stats, alerts = replay_file(settings, path, run_id, workers=workers, progress=progress)
    report = evaluate([to_dict(a) for a in alerts], labels)
    report.update({"cards": cards, "days": days, "seed": seed, "events": labels["n_events"],
                   "generate_s": round(gen_s, 2), "replay_s": round(stats.seconds, 2), "machine": machine()})
    if ml:
        try:
            from replay.ml_eval import evaluate_ml
        except ImportError:
            pass
        else:
            from claimwatch import runtime

            with runtime.services(settings.model_copy(update={"kafka_url": "unused"})) as s2:
                report["ml"] = evaluate_ml(cards=cards, days=days, seed=seed, redis_url=s2.redis_url)
    return report


def dump(report: dict, path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1, ensure_ascii=False))


def _rss_kb(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _stat(pid: int | str) -> list[str]:
    """``/proc/{pid}/stat`` after the command name (field 3 on, from index 0); [] when the process is gone."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _proc_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far; 0 when it is gone."""
    import os

    f = _stat(pid)
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK") if len(f) > 12 else 0.0


def _embedded_broker_pids() -> list[int]:
    """This process's embedded broker (Tansu) children, if it started one."""
    import os

    me, out = str(os.getpid()), []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and _stat(pid)[1:2] == [me]:
            try:
                if b"tansu" in open(f"/proc/{pid}/cmdline", "rb").read():
                    out.append(int(pid))
            except OSError:
                pass
    return out


def cpu_snapshot(rs: list[Any], worker_pids: list[int]) -> dict[str, float | None]:
    """CPU seconds used so far by the workers, Redis (``INFO cpu``: embedded or not; ``rs`` from
    :func:`redis_clients`: ``redis_aux`` is the second one's, None without one), the embedded broker
    (None when the broker is external) and this process (the replay publisher)."""
    import os

    cpu = []
    for x in rs:
        info = x.info("cpu")
        cpu.append(float(info["used_cpu_user"]) + float(info["used_cpu_sys"]))
    broker = _embedded_broker_pids()
    t = os.times()
    return {"workers": sum(_proc_cpu_s(p) for p in worker_pids),
            "redis": cpu[0], "redis_aux": cpu[1] if len(cpu) > 1 else None,
            "broker": sum(_proc_cpu_s(p) for p in broker) if broker else None,
            "publisher": t.user + t.system}


def redis_clients(settings: Settings) -> list[Any]:
    """A client of each Redis holding run state: the main one, then the aux one when configured."""
    import redis as sync_redis

    return [sync_redis.Redis.from_url(u) for u in settings.redis_urls]


def used_memory(rs: list[Any]) -> int:
    """Bytes Redis uses, over every Redis holding run state."""
    return sum(x.info("memory")["used_memory"] for x in rs)


def cpu_per_event_us(before: dict[str, float | None], after: dict[str, float | None], events: int) -> dict[str, float | None]:
    """µs of CPU per settlement of each process between two :func:`cpu_snapshot` calls.

    >>> cpu_per_event_us({"redis": 1.0, "broker": None}, {"redis": 1.5, "broker": None}, 10_000)
    {'redis': 50.0, 'broker': None}
    """
    return {k: (None if before[k] is None or after.get(k) is None else round((after[k] - before[k]) / events * 1e6, 1))
            for k in before}


def timed_replay(settings: Settings, path: Path, stats: Any, procs: list, r: Any, events: int, progress: Any,
                 idle_timeout_s: float) -> tuple[float, float, dict[str, float | None]]:
    """Publish ``path`` as run ``stats.run_id`` and wait until the workers processed it: (seconds publishing,
    seconds from the first produce to the last event processed, CPU µs per settlement of each process)."""
    import asyncio

    from replay.runner import publish_file, wait_done

    pids = [p.proc.pid for p in procs]
    cpu0 = cpu_snapshot(r, pids)
    t0 = time.perf_counter()
    asyncio.run(publish_file(settings, path, stats.run_id, stats, progress))
    pub_s = time.perf_counter() - t0
    asyncio.run(wait_done(settings, stats.run_id, stats, progress=progress, idle_timeout_s=idle_timeout_s,
                          alive=lambda: all(p.alive() for p in procs)))
    total_s = time.perf_counter() - t0
    return pub_s, total_s, cpu_per_event_us(cpu0, cpu_snapshot(r, pids), events)


def timed_drain(settings: Settings, stats: Any, procs: list, r: Any, idle_timeout_s: float,
                poll_s: float = 0.02) -> dict[str, Any]:
    """Time workers draining a backlog: run ``stats.run_id`` (``stats.published`` settlements) was published
    before they started. The clock starts when the run's first processed batch is recorded (not the workers'
    start-up) and stops when the run is done (:func:`~replay.runner.wait_done`); the rate and the CPU per
    settlement count the settlements processed in between."""
    import asyncio

    from replay.runner import wait_done

    pids = [p.proc.pid for p in procs]
    first: dict[str, Any] = {}

    def on_progress(_stage: str, n: int, _total: int | None) -> None:
        if n > 0 and not first:
            first.update(t=time.perf_counter(), n=n, cpu=cpu_snapshot(r, pids))

    asyncio.run(wait_done(settings, stats.run_id, stats, progress=on_progress, idle_timeout_s=idle_timeout_s,
                          alive=lambda: all(p.alive() for p in procs), poll_s=poll_s))
    secs = max(time.perf_counter() - first["t"], 1e-9)
    counted = stats.processed - first["n"]
    return {"settlements": counted, "first_batch": first["n"], "seconds": round(secs, 2),
            "per_s": round(counted / secs) if counted else None,
            "cpu_us_per_settlement": cpu_per_event_us(first["cpu"], cpu_snapshot(r, pids), max(counted, 1))}


def _wait_ready(procs, timeout_s: float = 120.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    pending = list(procs)
    while pending and time.monotonic() < deadline:
        for p in list(pending):
            if not p.alive():
                raise RuntimeError(f"worker exited while starting:\n{p.log_tail()}")
            try:
                body = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{p.web_port}/readyz", timeout=2).read())
                if body.get("partitions_assigned"):
                    pending.remove(p)
            except OSError:
                pass
        time.sleep(0.3)
    if pending:
        raise RuntimeError("workers not ready in time")


async def raw_transport(settings: Settings, lines: list[bytes], partitions: int) -> dict[str, float]:
    """Produce the lines to a fresh topic, then consume them with aiokafka and parse each with orjson."""
    import orjson
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from stream.topics import ensure_topics

    topic = f"bench-raw-{int(time.time() * 1000)}"
    await ensure_topics(settings.bootstrap_servers, [topic], partitions)
    prod = AIOKafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=20, max_batch_size=1 << 20,
                            max_request_size=16 << 20)
    await prod.start()
    t0 = time.perf_counter()
    try:
        parts = sorted(await prod.partitions_for(topic))
        batches = {p: prod.create_batch() for p in parts}
        futs = []
        for i, ln in enumerate(lines):
            p = parts[i % len(parts)]
            if batches[p].append(key=None, value=ln, timestamp=None) is None:
                futs.append(await prod.send_batch(batches[p], topic, partition=p))
                batches[p] = prod.create_batch()
                batches[p].append(key=None, value=ln, timestamp=None)
        for p, b in batches.items():
            if b.record_count():
                futs.append(await prod.send_batch(b, topic, partition=p))
        for f in futs:
            await f
    finally:
        await prod.stop()
    produce_s = time.perf_counter() - t0
    cons = AIOKafkaConsumer(topic, bootstrap_servers=settings.bootstrap_servers, group_id=None,
                            auto_offset_reset="earliest", fetch_max_bytes=16 << 20,
                            max_partition_fetch_bytes=8 << 20)
    await cons.start()
    n = 0
    t0 = time.perf_counter()
    try:
        while n < len(lines):
            got = await cons.getmany(timeout_ms=1000, max_records=20000)
            for recs in got.values():
                for r in recs:
                    orjson.loads(r.value)
                n += sum(len(v) for v in got.values()) and 0
                n += len(recs)
    finally:
        await cons.stop()
    consume_s = time.perf_counter() - t0
    return {"produce_per_s": len(lines) / produce_s, "consume_parse_per_s": len(lines) / consume_s}


def _distinct_cards(lines: list[bytes]) -> int:
    """Distinct ``card_id`` values of the settlements (the cards active in the run)."""
    import orjson

    return len({orjson.loads(line).get("card_id") for line in lines})


def _memory_by_group(rs: list[Any], run_id: str, sample: int = 2000) -> dict[str, dict[str, int]]:
    """Keys and estimated bytes of a run's state by group (``c``/``h`` card hashes, else the rule), over every
    Redis in ``rs``: every key is counted, ``MEMORY USAGE`` is sampled on up to ``sample`` keys a group."""
    import random

    prefix = f"cw:{run_id}:"
    out: dict[str, dict[str, int]] = {}
    for r in rs:
        groups: dict[str, list[bytes]] = {}
        counts: dict[str, int] = {}
        rng = random.Random(0)
        for k in r.scan_iter(match=prefix + "*", count=5000):
            g = k[len(prefix):].split(b":", 1)[0].decode("utf-8", "replace")
            n = counts[g] = counts.get(g, 0) + 1
            keep = groups.setdefault(g, [])
            if len(keep) < sample:
                keep.append(k)
            elif rng.random() < sample / n:  # reservoir sample
                keep[rng.randrange(sample)] = k
        for g, keys in groups.items():
            pipe = r.pipeline(transaction=False)
            for k in keys:
                pipe.memory_usage(k, samples=0)
            sizes = [x or 0 for x in pipe.execute()]
            tot = out.setdefault(g, {"keys": 0, "bytes": 0})
            tot["keys"] += counts[g]
            tot["bytes"] += round(sum(sizes) / max(1, len(sizes)) * counts[g])
    return dict(sorted(out.items()))


def throughput(settings: Settings, *, events: int, workers: int, seed: int = 1, progress=None,
               log=print, repeat: int = 1, drain: bool = True) -> dict[str, Any]:
    """The raw transport, then the full pipeline ``repeat`` times over the same settlements (each a new
    run: fresh state); ``pipeline`` is the median run, ``pipeline_runs`` all of them. Redis memory per
    card and worker RSS are of the first run. ``drain``: then the same settlements published with no
    worker running, and the time new workers take to work off that backlog (:func:`timed_drain`): the
    pipeline's sustained rate, without the publisher competing for the cores."""
    import asyncio

    from claimwatch import runtime
    from replay.city import generate_day_fast
    from replay.runner import ReplayStats, drop_run_state, publish_file

    report: dict[str, Any] = {"events": events, "workers": workers, "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="cw-bench-") as d:
        t0 = time.perf_counter()
        lines = list(generate_day_fast(events, seed))
        path = Path(d) / "day.jsonl"
        with open(path, "wb") as fh:
            fh.writelines(lines)
        report["generate_s"] = round(time.perf_counter() - t0, 2)
        cards = _distinct_cards(lines)
        with runtime.services(settings) as s2:
            log("raw transport (aiokafka produce, then consume + orjson parse)…")
            report["raw"] = asyncio.run(raw_transport(s2, lines, s2.topic_partitions))
            del lines
            with runtime.workers(s2, workers) as procs:
                _wait_ready(procs)
                r = redis_clients(s2)
                pids = [p.proc.pid for p in procs]
                runs = []
                for k in range(repeat):
                    run_id = f"bench-{int(time.time())}-{k}"
                    stats = ReplayStats(run_id)
                    log(f"full pipeline with {workers} worker(s)" + (f", run {k + 1} of {repeat}…" if repeat > 1 else "…"))
                    if k == 0:   # memory and RSS: the first run, from an idle worker and empty state
                        mem0 = used_memory(r)
                        rss0 = [_rss_kb(p) for p in pids]
                    t_pub, pipe_s, cpu = timed_replay(s2, path, stats, procs, r, events, progress, 300)
                    runs.append({"seconds": round(pipe_s, 2), "publish_s": round(t_pub, 2),
                                 "per_s": round(events / pipe_s), "processed": stats.processed,
                                 "cpu_us_per_settlement": cpu})
                    if k == 0:
                        mem1 = used_memory(r)
                        rss1 = [_rss_kb(p) for p in pids]
                        report["redis_bytes_by_key_group"] = _memory_by_group(r, run_id)
                    asyncio.run(drop_run_state(s2.redis_urls, run_id))
            if drain:
                run_id = f"bench-{int(time.time())}-drain"
                stats = ReplayStats(run_id)
                log("backlog drain: publishing with no worker running, then starting the worker(s)…")
                asyncio.run(publish_file(s2, path, run_id, stats, progress))
                with runtime.workers(s2, workers) as procs:
                    report["drain"] = timed_drain(s2, stats, procs, r, 300)
                asyncio.run(drop_run_state(s2.redis_urls, run_id))
        report["pipeline_runs"] = runs
        report["pipeline"] = sorted(runs, key=lambda x: x["per_s"])[(len(runs) - 1) // 2]
        report["ratio_pipeline_to_raw"] = round(report["pipeline"]["per_s"] / report["raw"]["consume_parse_per_s"], 3)
        report["redis_bytes_per_active_card"] = round((mem1 - mem0) / max(1, cards)) if cards else None
        report["active_cards"] = cards
        report["worker_rss_mb"] = {"start": [round(x / 1024) for x in rss0], "end": [round(x / 1024) for x in rss1]}
    return report


def latency(settings: Settings, *, rate: float, seconds: float = 30.0, probes_per_s: float = 4.0,
            log=print) -> dict[str, Any]:
    """p50/p95/p99 of settlement → alert latency at a fixed offered load.

    A background of ordinary settlements is offered at ``rate``; alongside, probe cards that
    already settled at 11 institutions settle at a 12th: the card_hopping alert it triggers is
    timed from the probe's produce call to its arrival on the alerts topic (wall clock).
    """
    import asyncio

    import orjson
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from claimwatch import runtime
    from replay.city import generate_day_fast
    from stream.topics import ensure_topics

    background = list(generate_day_fast(int(rate * seconds) + 1000, 9))
    tz = timezone(timedelta(hours=8))

    def ev(card: str, inst: str, t: float, eid: str) -> bytes:
        return orjson.dumps({
            "event_id": eid, "event_time": datetime.fromtimestamp(t, tz).isoformat(), "card_id": card,
            "institution_id": inst, "institution_type": "pharmacy", "district": "310101", "visit_type": "pharmacy",
            "items": [{"code": "XB01ACA002", "category": "drug", "quantity": 1, "amount": 96.0, "days_supply": 28}],
            "total_amount": 96.0, "fund_paid": 60.0})

    async def go(s: Settings) -> dict[str, Any]:
        p = AIOKafkaProducer(bootstrap_servers=s.bootstrap_servers, linger_ms=2)
        c = AIOKafkaConsumer(s.topic_alerts, bootstrap_servers=s.bootstrap_servers, group_id=None,
                             auto_offset_reset="latest", fetch_max_wait_ms=5)
        await p.start()
        await c.start()
        n_probes = int(seconds * probes_per_s)
        tag = f"{int(time.time())}"
        sent_at: dict[str, float] = {}
        got: dict[str, float] = {}
        now = time.time()
        for k in range(n_probes):  # 11 institutions each, an hour ago
            card = f"LAT{tag}{k:05d}"
            for i in range(11):
                await p.send(s.topic_settlements, ev(card, f"PL{i:03d}", now - 3600 + i * 60, f"{card}-{i}"),
                             key=card.encode())
        await p.flush()
        await asyncio.sleep(3.0)

        async def consume() -> None:
            async for rec in c:
                a = orjson.loads(rec.value)
                if a["subject_id"].startswith(f"LAT{tag}") and a["rule"] == "card_hopping":
                    got.setdefault(a["subject_id"], time.time())

        task = asyncio.create_task(consume())
        t0 = time.monotonic()
        sent = 0
        next_probe = 0
        try:
            while time.monotonic() - t0 < seconds:
                burst = max(1, int(rate / 50))
                for line in background[sent:sent + burst]:
                    await p.send(s.topic_settlements, line.rstrip(b"\n"))
                sent += burst
                el = time.monotonic() - t0
                while next_probe < n_probes and next_probe / probes_per_s <= el:
                    card = f"LAT{tag}{next_probe:05d}"
                    sent_at[card] = time.time()
                    await p.send(s.topic_settlements, ev(card, "PL999", time.time(), f"{card}-x"), key=card.encode())
                    next_probe += 1
                wait = t0 + sent / rate - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            await p.flush()
            deadline = time.monotonic() + 15
            while len(got) < len(sent_at) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        finally:
            task.cancel()
            await p.stop()
            await c.stop()
        lat = sorted(got[k] - sent_at[k] for k in got if k in sent_at)

        def q(x: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(x * len(lat)))] * 1000, 1) if lat else None

        return {"offered_rate": rate, "seconds": seconds, "background_sent": sent, "probes": len(sent_at),
                "alerts_seen": len(lat), "p50_ms": q(0.50), "p95_ms": q(0.95), "p99_ms": q(0.99),
                "max_ms": round(lat[-1] * 1000, 1) if lat else None}

    with runtime.services(settings) as s, runtime.workers(s, 1) as procs:
        asyncio.run(ensure_topics(s.bootstrap_servers, [s.topic_settlements, s.topic_replay, s.topic_alerts,
                                                        s.topic_dlq], s.topic_partitions))
        _wait_ready(procs)
        log(f"offering {rate:.0f} settlements/s for {seconds:.0f} s with {probes_per_s:.0f} probes/s…")
        return asyncio.run(go(s))


def day(settings: Settings, *, events: int = 1_200_000, workers: int = 1, seed: int = 1, progress=None,
        log=print) -> dict[str, Any]:
    """Replay a generated city day (1.2 million settlements) at maximum speed; report the time."""
    import asyncio

    from claimwatch import runtime
    from replay.city import generate_day_fast
    from replay.runner import ReplayStats, drop_run_state

    with tempfile.TemporaryDirectory(prefix="cw-day-") as d:
        path = Path(d) / "day.jsonl"
        t0 = time.perf_counter()
        with open(path, "wb") as fh:
            for line in generate_day_fast(events, seed):
                fh.write(line)
        gen_s = time.perf_counter() - t0
        with runtime.services(settings) as s, runtime.workers(s, workers) as procs:
            _wait_ready(procs)
            run_id = f"day-{int(time.time())}"
            st = ReplayStats(run_id)
            log(f"replaying {events:,} settlements with {workers} worker(s)…")
            pub_s, total_s, cpu = timed_replay(s, path, st, procs, redis_clients(s), events, progress, 600)
            asyncio.run(drop_run_state(s.redis_urls, run_id))
    return {"events": events, "workers": workers, "generate_s": round(gen_s, 1), "publish_s": round(pub_s, 1),
            "seconds": round(total_s, 1), "per_s": round(events / total_s), "processed": st.processed,
            "cpu_us_per_settlement": cpu, "target_s": 180, "machine": machine()}
