"""The ``claimwatch`` command line (typer + rich)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from claimwatch.settings import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="claimwatch: real-time fraud monitoring for medical-insurance settlements (医保结算).")
alerts_app = typer.Typer(no_args_is_help=True, help="Query and export alerts from the alert store.")
rules_app = typer.Typer(no_args_is_help=True, help="Check rule configuration.")
exemptions_app = typer.Typer(no_args_is_help=True, help="Exemptions (豁免): long prescriptions, chronic approvals.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print numbers.")
dq_app = typer.Typer(no_args_is_help=True, help="Data-quality findings (placeholder ids).")
app.add_typer(alerts_app, name="alerts")
app.add_typer(rules_app, name="rules")
app.add_typer(exemptions_app, name="exemptions")
app.add_typer(bench_app, name="bench")
app.add_typer(dq_app, name="dq")

console = Console(stderr=True)


def fail(msg: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(code)


def load_settings() -> Settings:
    try:
        return Settings()
    except Exception as exc:  # pydantic ValidationError: say which variable
        fail(f"invalid settings in the environment (CLAIMWATCH_*): {exc}")
        raise


@app.command()
def worker(web_port: int = typer.Option(0, help="web port for /healthz and /metrics (0 = pick a free one)"),
           loglevel: str = typer.Option("warn", help="crit, error, warn, info or debug")) -> None:
    """Run one stream worker (needs CLAIMWATCH_KAFKA_URL and CLAIMWATCH_REDIS_URL)."""
    from detectors.config import ConfigError
    from stream.app import run_worker
    from stream.embedded import free_port

    s = load_settings()
    if not s.kafka_url or not s.redis_url:
        fail("a worker needs CLAIMWATCH_KAFKA_URL and CLAIMWATCH_REDIS_URL; "
             "`claimwatch demo` and `claimwatch replay` start embedded ones for you")
    try:
        run_worker(s, web_port=web_port or s.worker_web_port or free_port(), loglevel=loglevel)
    except ConfigError as exc:
        fail(str(exc))


@app.command()
def generate(cards: int = typer.Option(20_000, min=10, help="number of insured cards"),
             days: int = typer.Option(7, min=1, max=400, help="days of settlements"),
             seed: int = typer.Option(1, help="random seed (same seed, same file)"),
             out: Path = typer.Option(..., help="output .jsonl or .jsonl.gz"),
             labels: Optional[Path] = typer.Option(None, help="write the injected-fraud labels here (JSON)")) -> None:
    """Generate a synthetic Shanghai-like city of settlements with labelled, injected fraud."""
    from replay import city

    t0 = time.perf_counter()
    with console.status(f"generating {cards:,} cards × {days} days (seed {seed})…"):
        events, lab = city.generate(cards=cards, days=days, seed=seed)
        city.write(events, lab, out, labels)
    n_fraud = len(lab.get("frauds", []))
    console.print(f"wrote {len(events):,} settlements to {out} ({n_fraud} injected frauds) "
                  f"in {time.perf_counter() - t0:.1f} s")


def _stage_progress(prog: Progress, names: dict[str, str] | None = None):
    """A ``progress(stage, done, total)`` callback that keeps one bar per stage."""
    tasks: dict[str, int] = {}

    def on_progress(stage: str, done: int, total: int | None) -> None:
        if stage not in tasks:
            tasks[stage] = prog.add_task((names or {}).get(stage, stage), total=total)
        prog.update(tasks[stage], completed=done, total=total)

    return on_progress


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


@app.command()
def replay(file: Path = typer.Argument(..., help="settlements, one JSON per line (.jsonl or .jsonl.gz)"),
           run_id: str = typer.Option(..., "--run-id", help="names this run's state and alerts"),
           alerts_out: Optional[Path] = typer.Option(None, "--alerts-out", help="write the run's alerts here (JSON Lines)"),
           workers: int = typer.Option(1, min=0, max=16, help="worker processes to start for this replay "
                                       "(0 = use workers already running)"),
           keep_state: bool = typer.Option(False, help="keep the run's Redis windows after it ends"),
           idle_timeout: float = typer.Option(120.0, help="give up when no event is processed for this long (s)"),
           lang: str = typer.Option("zh", help="language of summaries in --alerts-out: zh or en")) -> None:
    """Replay a settlements file through the broker and workers; write its alerts."""
    from alerts.store import write_jsonl
    from replay.runner import ReplayError, check_run_id, replay_file

    s = load_settings()
    try:
        check_run_id(run_id)
    except ReplayError as exc:
        fail(str(exc))
    if not file.is_file():
        fail(f"no such file: {file}")
    if alerts_out is not None and alerts_out.is_dir():
        fail(f"--alerts-out {alerts_out} is a directory; give a file name")
    if lang not in ("zh", "en"):
        fail(f"--lang must be zh or en, got {lang!r}")
    if workers == 0 and (not s.kafka_url or not s.redis_url):
        fail("--workers 0 needs running workers, so CLAIMWATCH_KAFKA_URL and CLAIMWATCH_REDIS_URL must be set")
    with _progress() as prog:
        on_progress = _stage_progress(prog, {"publish": "publishing lines", "process": "processed events"})
        try:
            stats, alerts = replay_file(s, file, run_id, workers=workers, keep_state=keep_state,
                                        idle_timeout_s=idle_timeout, progress=on_progress, log=console.print)
        except ReplayError as exc:
            fail(str(exc), 1)
    if alerts_out is not None:
        alerts_out.parent.mkdir(parents=True, exist_ok=True)
        with open(alerts_out, "wb") as fh:
            write_jsonl((_in_lang(a, lang) for a in alerts), fh)
    console.print(f"run [bold]{run_id}[/]: {stats.lines:,} lines, {stats.published:,} published, "
                  f"{stats.blank:,} blank and {stats.invalid:,} invalid lines skipped (invalid ones sent to "
                  f"{s.topic_dlq}), {stats.processed:,} processed, {stats.alerts:,} alerts in {stats.seconds:.1f} s")
    for ex in stats.invalid_examples:
        console.print(f"  [yellow]invalid[/] {ex}")
    late = stats.extra.get("late", 0)
    if late:
        console.print(f"  [yellow]{late:,} settlements arrived later than the allowed lateness[/] (counted; "
                      "they may be missing from windows that had already moved on)")
    for fld, per_inst in stats.extra.get("data_quality", {}).items():
        top = sorted(per_inst.items(), key=lambda kv: -kv[1])[:5]
        console.print(f"  [yellow]data quality[/]: {sum(per_inst.values()):,} settlements with a placeholder "
                      f"{fld} (not attributed to anyone); most at " + ", ".join(f"{i} ({n})" for i, n in top))
    if alerts_out is not None:
        console.print(f"alerts written to {alerts_out}")


def _in_lang(a, lang: str):
    import msgspec

    if lang == "en" and a.summary_en:
        return msgspec.structs.replace(a, summary=a.summary_en)
    return a


@alerts_app.command("export")
def alerts_export(run_id: Optional[str] = typer.Option(None, "--run-id"),
                  rule: Optional[str] = typer.Option(None, "--rule"),
                  severity: Optional[str] = typer.Option(None, "--severity"),
                  subject: Optional[str] = typer.Option(None, "--subject", help="card, physician, institution or ring id"),
                  since: Optional[str] = typer.Option(None, help="window_end ≥ this ISO time"),
                  until: Optional[str] = typer.Option(None, help="window_end < this ISO time"),
                  fmt: str = typer.Option("jsonl", "--format", help="jsonl (the contract) or csv"),
                  out: Optional[Path] = typer.Option(None, "--out", help="file to write (default: stdout)"),
                  include_suppressed: bool = typer.Option(True, help="include alerts silenced by an exemption "
                                                          "(they carry suppressed: true)"),
                  lang: str = typer.Option("zh", help="language of summaries: zh or en")) -> None:
    """Export alerts from the store as JSON Lines (one alert per line, alert.schema.json)."""
    from alerts.model import to_dict
    from alerts.store import AlertStore, write_jsonl

    s = load_settings()
    if fmt not in ("jsonl", "csv"):
        fail(f"--format must be jsonl or csv, got {fmt!r}")
    if lang not in ("zh", "en"):
        fail(f"--lang must be zh or en, got {lang!r}")
    if out is not None and out.is_dir():
        fail(f"--out {out} is a directory; give a file name")
    from alerts.store import parse_instant

    for name, val in (("since", since), ("until", until)):
        if val is not None:
            try:
                parse_instant(val, name)
            except ValueError as exc:
                fail(str(exc))
    store = AlertStore(s.store_url_resolved)
    it = (_in_lang(a, lang) for a in store.iter(run_id=run_id, rule=rule, severity=severity, subject_id=subject,
                                                 since=since, until=until)
          if include_suppressed or not a.suppressed)
    fh = open(out, "wb") if out else sys.stdout.buffer
    try:
        if fmt == "jsonl":
            n = write_jsonl(it, fh)
        else:
            import csv
            import io

            cols = ["alert_id", "run_id", "rule", "severity", "score", "subject_type", "subject_id", "window_start",
                    "window_end", "status", "summary", "evidence_event_ids"]
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            n = 0
            for a in it:
                d = to_dict(a)
                d["evidence_event_ids"] = " ".join(d["evidence_event_ids"])
                w.writerow(d)
                n += 1
            fh.write(buf.getvalue().encode("utf-8"))
    finally:
        if out:
            fh.close()
        else:
            fh.flush()
    console.print(f"{n} alert(s) exported" + (f" to {out}" if out else ""))


@alerts_app.command("verdict")
def alerts_verdict(alert_id: str = typer.Argument(..., help="the alert's id (A-…)"),
                   fraud: bool = typer.Option(False, "--fraud", help="confirmed fraud (违规)"),
                   false_positive: bool = typer.Option(False, "--false-positive", help="not fraud"),
                   author: str = typer.Option(..., help="the inspector giving the verdict"),
                   note: Optional[str] = typer.Option(None, help="free text")) -> None:
    """Publish an inspector's verdict on an alert (topic `verdicts`); the online ranking learns from it."""
    from alerts.verdicts import InvalidVerdict, verdict_command

    if fraud == false_positive:
        fail("give exactly one of --fraud or --false-positive")
    s = load_settings()
    if not s.kafka_url:
        fail("publishing a verdict needs CLAIMWATCH_KAFKA_URL (the broker the workers read)")
    try:
        v = verdict_command(s, alert_id, "fraud" if fraud else "false_positive", author, note)
    except LookupError as exc:
        fail(f"no alert {alert_id!r} in the store ({exc})", 1)
    except (InvalidVerdict, RuntimeError) as exc:
        fail(str(exc))
    console.print(f"verdict {v.verdict} on {v.alert_id} by {v.author} published")


@rules_app.command("check")
def rules_check(path: Optional[Path] = typer.Argument(None, help="rules YAML (default: the configured one)")) -> None:
    """Validate a rule configuration and print each rule's version."""
    from detectors.config import ConfigError, load_rules

    s = load_settings()
    p = path or s.rules_path
    try:
        rs = load_rules(p)
    except ConfigError as exc:
        fail(str(exc), 1)
    for d in rs.detectors:
        console.print(f"[green]ok[/] {d.rule} (version {rs.versions[d.rule]}): {d!r}")
    console.print(f"rule set version {rs.version}, lateness_s={rs.lateness_s}")


@app.command()
def demo(rate: float = typer.Option(50.0, min=0.1, help="settlements per second (Shanghai peaks near 170/s)"),
         cards: int = typer.Option(20_000, min=100, help="insured cards in the simulated city"),
         seed: int = typer.Option(7),
         duration: Optional[float] = typer.Option(None, help="stop after this many seconds (default: until Ctrl-C)")) -> None:
    """Start the embedded stack and a worker, stream a live synthetic city, and show alerts as they fire."""
    from replay.demo import run_demo

    s = load_settings()
    try:
        run_demo(s, rate=rate, cards=cards, seed=seed, duration_s=duration, console=console)
    except KeyboardInterrupt:
        pass


@app.command("rebuild-state")
def rebuild_state_cmd(since: str = typer.Option(..., "--from", help="ISO time: rebuild from settlements appended "
                                                "since then (at least one longest window back)"),
                      run_id: str = typer.Option("live", "--run-id"),
                      topic: Optional[str] = typer.Option(None, help="default: the settlements topic")) -> None:
    """Rebuild the Redis windows from the settlements log (after Redis state was lost)."""
    from datetime import datetime

    from replay.rebuild import run as rebuild

    from replay.runner import ReplayError, check_run_id

    if run_id != "live":
        try:
            check_run_id(run_id)
        except ReplayError as exc:
            fail(str(exc))
    s = load_settings()
    if not s.kafka_url or not s.redis_url:
        fail("rebuild-state needs CLAIMWATCH_KAFKA_URL and CLAIMWATCH_REDIS_URL (the log and the Redis to rebuild)")
    try:
        dt = datetime.fromisoformat(since)
    except ValueError:
        fail(f"--from must be an ISO date or date-time, got {since!r}")
    if dt.tzinfo is None:
        from datetime import timedelta, timezone

        dt = dt.replace(tzinfo=timezone(timedelta(hours=8)))
    with _progress() as prog:
        task = prog.add_task("rebuilding from the log", total=None)
        st = rebuild(s, dt.timestamp(), run_id=run_id, topic=topic,
                     progress=lambda done, total: prog.update(task, completed=done, total=total))
    console.print(f"rebuilt state of run {run_id} from {st.messages:,} messages ({st.events:,} settlements, "
                  f"{st.invalid:,} invalid skipped) in {st.seconds:.1f} s")


def _need_redis(s: Settings) -> None:
    if not s.redis_url:
        fail("this command needs CLAIMWATCH_REDIS_URL (the Redis the workers use); "
             "for the embedded default, list entries in configs/exemptions.yaml instead")


@exemptions_app.command("add")
def exemptions_add(subject: str = typer.Argument(..., help="card, physician or institution id"),
                   rule: list[str] = typer.Option(..., "--rule", help="rule id to silence (repeat; * = all)"),
                   kind: str = typer.Option(..., help="long_prescription, chronic_approval, special_disease or other"),
                   author: str = typer.Option(..., help="who approved it"),
                   reason: str = typer.Option(..., help="why, e.g. the approval number"),
                   expires: str = typer.Option(..., help="ISO date or date-time (+08:00 when no offset)"),
                   valid_from: Optional[str] = typer.Option(None, help="ISO date (default: always)")) -> None:
    """Add an exemption to Redis; workers pick it up within 30 s."""
    import redis as sync_redis

    from alerts.exemptions import REDIS_KEY, ExemptionError, entry_id, validate_entry
    from detectors import REGISTRY

    s = load_settings()
    _need_redis(s)
    for r in rule:
        if r != "*" and r not in REGISTRY:
            fail(f"--rule {r!r} is not a rule; known: {', '.join(sorted(REGISTRY))}")
    e = {"subject_id": subject, "rules": list(rule), "kind": kind, "author": author, "reason": reason,
         "expires": expires, "valid_from": valid_from, "added_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        validate_entry(e, "exemption")
    except ExemptionError as exc:
        fail(str(exc))
    r = sync_redis.Redis.from_url(s.redis_url)
    eid = entry_id(e)
    r.hset(REDIS_KEY, eid, json.dumps(e, ensure_ascii=False))
    console.print(f"exemption {eid} added for {subject}: {', '.join(rule)} until {expires}")


@exemptions_app.command("list")
def exemptions_list() -> None:
    """List exemptions (file and Redis)."""
    from rich.table import Table

    from alerts.exemptions import REDIS_KEY, ExemptionRegistry

    s = load_settings()
    rows = []
    for sub, entries in ExemptionRegistry.load_file(s.exemptions_path)._by_subject.items():
        rows += [("file", e) for e in entries]
    if s.redis_url:
        import redis as sync_redis

        for k, v in sync_redis.Redis.from_url(s.redis_url).hgetall(REDIS_KEY).items():
            rows.append((k.decode(), json.loads(v)))
    t = Table("id", "subject", "rules", "kind", "author", "reason", "expires")
    for src, e in rows:
        t.add_row(src, e["subject_id"], ",".join(e["rules"]), e["kind"], e["author"], e["reason"], str(e["expires"]))
    Console().print(t)


@exemptions_app.command("remove")
def exemptions_remove(entry: str = typer.Argument(..., help="id shown by `exemptions list`")) -> None:
    """Remove a Redis exemption by id."""
    import redis as sync_redis

    from alerts.exemptions import REDIS_KEY

    s = load_settings()
    _need_redis(s)
    if not sync_redis.Redis.from_url(s.redis_url).hdel(REDIS_KEY, entry):
        fail(f"no exemption {entry!r} in Redis", 1)
    console.print(f"exemption {entry} removed")


@dq_app.command("report")
def dq_report(run_id: str = typer.Option("live", "--run-id")) -> None:
    """Placeholder ids seen per field and institution (counted, never blamed on a card or physician)."""
    import redis as sync_redis
    from rich.table import Table

    from replay.runner import ReplayError, check_run_id

    if run_id != "live":
        try:
            check_run_id(run_id)
        except ReplayError as exc:
            fail(str(exc))
    s = load_settings()
    _need_redis(s)
    raw = sync_redis.Redis.from_url(s.redis_url).hgetall(f"cw:{run_id}:dq")
    t = Table("field", "institution", "settlements")
    for k, v in sorted(raw.items(), key=lambda kv: -int(kv[1])):
        fld, inst = k.decode().split("\t", 1)
        t.add_row(fld, inst, str(int(v)))
    Console().print(t)


@bench_app.command("quality")
def bench_quality(cards: int = typer.Option(20_000, min=100), days: int = typer.Option(7, min=1, max=90),
                  seed: int = typer.Option(1), workers: int = typer.Option(1, min=1, max=8),
                  json_out: Optional[Path] = typer.Option(Path("bench-results/quality.json"), "--json-out"),
                  ml: bool = typer.Option(True, help="also evaluate the online model (ROC/PR AUC, verdict gain)")) -> None:
    """Replay a generated city through the real pipeline; print recall per pattern, look-alikes alerted,
    subject precision and alerts per 1,000 events."""
    from rich.table import Table

    from replay.bench import dump, quality

    s = load_settings()
    with _progress() as prog:
        on_progress = _stage_progress(prog)
        rep = quality(s, cards=cards, days=days, seed=seed, workers=workers, progress=on_progress, ml=ml)
    out = Console()
    t = Table(title=f"detection quality — {cards:,} cards × {days} days, seed {seed}, {rep['events']:,} settlements")
    t.add_column("pattern")
    t.add_column("injected", justify="right")
    t.add_column("caught", justify="right")
    t.add_column("recall", justify="right")
    for rule, p in rep["patterns"].items():
        style = "green" if p["recall"] >= 0.95 else "red"
        t.add_row(rule, str(p["injected"]), str(p["caught"]), f"[{style}]{p['recall']:.2f}[/]")
    out.print(t)
    t2 = Table(title="legitimate look-alikes alerted")
    t2.add_column("look-alike")
    t2.add_column("n", justify="right")
    t2.add_column("alerted", justify="right")
    t2.add_column("share", justify="right")
    for k, v in rep["lookalikes"].items():
        style = "green" if v["alerted_share"] <= 0.05 else "red"
        t2.add_row(k, str(v["n"]), str(v["alerted"]), f"[{style}]{v['alerted_share']:.1%}[/]")
    out.print(t2)
    out.print(f"subject precision {rep['precision']:.3f} ({rep['subjects_alerted']} subjects alerted), "
              f"{rep['alerts']} alerts = {rep['alerts_per_1000_events']:.2f} per 1,000 settlements; "
              f"replay {rep['replay_s']:.1f} s")
    if rep.get("false_subjects"):
        out.print("false subjects: " + ", ".join(rep["false_subjects"][:15]))
    if "ml" in rep:
        out.print("online model: " + json.dumps(rep["ml"], ensure_ascii=False))
    dump(rep, json_out)
    if json_out:
        console.print(f"results written to {json_out}")


@bench_app.command("throughput")
def bench_throughput(events: int = typer.Option(200_000, min=1000, help="settlements to push through"),
                     workers: int = typer.Option(1, min=1, max=8),
                     rate: float = typer.Option(2000.0, min=1, help="offered load for the latency measurement"),
                     latency_s: float = typer.Option(30.0, "--latency-seconds", min=0,
                                                     help="how long to measure latency (0 = skip)"),
                     repeat: int = typer.Option(1, min=1, max=20,
                                                help="run the pipeline this many times; the table shows the median "
                                                     "run and every run's rate"),
                     drain: bool = typer.Option(True, "--drain/--no-drain",
                                                help="also time workers started on a published backlog (the "
                                                     "sustained rate, no publisher competing for the cores)"),
                     json_out: Optional[Path] = typer.Option(Path("bench-results/throughput.json"), "--json-out")) -> None:
    """Raw transport rate vs the full pipeline (all detectors), their ratio, CPU per settlement of each
    process, the sustained rate (a published backlog drained), latency at a fixed load, Redis memory per
    active card and worker RSS."""
    from rich.table import Table

    from replay.bench import dump, latency, throughput

    s = load_settings()
    rep = throughput(s, events=events, workers=workers, repeat=repeat, drain=drain, log=lambda m: console.print(m))
    if latency_s > 0:
        rep["latency"] = latency(s, rate=rate, seconds=latency_s, log=lambda m: console.print(m))
    t = Table(title=f"claimwatch throughput — {events:,} settlements, {workers} worker(s), "
                    f"{rep['machine']['cores']} cores, {rep['machine']['date']}")
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_row("raw transport: produce (events/s)", f"{rep['raw']['produce_per_s']:,.0f}")
    t.add_row("raw transport: consume + JSON parse (events/s)", f"{rep['raw']['consume_parse_per_s']:,.0f}")
    t.add_row("full pipeline, all detectors, first produce → last alert stored (events/s)",
              f"{rep['pipeline']['per_s']:,.0f}")
    if len(rep["pipeline_runs"]) > 1:
        t.add_row("  every run (events/s)", ", ".join(f"{x['per_s']:,}" for x in rep["pipeline_runs"]))
    t.add_row("pipeline / raw", f"{rep['ratio_pipeline_to_raw']:.2f}")
    t.add_row("CPU per settlement (µs): workers / Redis (+ aux) / broker / replay publisher",
              _cpu_row(rep["pipeline"]["cpu_us_per_settlement"]))
    if rep.get("drain"):
        D = rep["drain"]
        t.add_row("sustained: backlog drained by workers started after publishing (events/s)",
                  f"{D['per_s']:,}" if D["per_s"] else "-")
        t.add_row("  CPU per settlement (µs): workers / Redis (+ aux) / broker / -", _cpu_row(D["cpu_us_per_settlement"]))
    if "latency" in rep and rep["latency"]["p50_ms"] is not None:
        L = rep["latency"]
        t.add_row(f"event → alert latency at {L['offered_rate']:,.0f}/s: p50 / p95 / p99 (ms)",
                  f"{L['p50_ms']} / {L['p95_ms']} / {L['p99_ms']}")
    t.add_row("Redis bytes per active card", str(rep["redis_bytes_per_active_card"]))
    cards = rep.get("active_cards") or 0
    for g, v in (rep.get("redis_bytes_by_key_group") or {}).items():
        name = {"c": "card hashes (recent)", "h": "card hashes (calendar)"}.get(g, g)
        t.add_row(f"  Redis: {name}", f"{v['keys']:,} keys, {v['bytes'] / max(1, cards):,.0f} B/card")
    t.add_row("worker RSS start → end (MB)" + (", first run" if len(rep["pipeline_runs"]) > 1 else ""), f"{rep['worker_rss_mb']['start']} → {rep['worker_rss_mb']['end']}")
    Console().print(t)
    dump(rep, json_out)


def _cpu_row(cpu: dict) -> str:
    """``workers / Redis (+ aux) / broker / publisher`` µs (``-``: not measured, e.g. an external broker); with an aux
    Redis, its µs follow the main one's: ``main + aux``.

    >>> _cpu_row({"workers": 70.0, "redis": 55.5, "redis_aux": 26.0, "broker": None, "publisher": 7.5})
    '70.0 / 55.5 + 26.0 / - / 7.5'
    """
    def one(k: str) -> str:
        return "-" if cpu.get(k) is None else f"{cpu[k]:.1f}"
    redis = one("redis") + (f" + {one('redis_aux')}" if cpu.get("redis_aux") is not None else "")
    return " / ".join((one("workers"), redis, one("broker"), one("publisher")))


@bench_app.command("day")
def bench_day(events: int = typer.Option(1_200_000, min=1000), workers: int = typer.Option(1, min=1, max=8),
              json_out: Optional[Path] = typer.Option(Path("bench-results/day.json"), "--json-out")) -> None:
    """Replay a generated 1.2-million-settlement city day at maximum speed and report the time."""
    from replay.bench import day, dump

    s = load_settings()
    with _progress() as prog:
        on_progress = _stage_progress(prog)
        rep = day(s, events=events, workers=workers, progress=on_progress, log=lambda m: console.print(m))
    Console().print(f"{rep['events']:,} settlements in {rep['seconds']} s ({rep['per_s']:,}/s) with "
                    f"{workers} worker(s); target ≤ 180 s; CPU per settlement (µs) workers / Redis (+ aux) / broker / "
                    f"replay publisher: {_cpu_row(rep['cpu_us_per_settlement'])}")
    dump(rep, json_out)


@bench_app.command("soak")
def bench_soak(minutes: float = typer.Option(20.0, min=0.1), rate: float = typer.Option(2000.0, min=1),
               cards: int = typer.Option(50_000, min=1000),
               json_out: Optional[Path] = typer.Option(Path("bench-results/soak.json"), "--json-out")) -> None:
    """Steady offered load for a long time; print worker RSS, Redis memory and lag at start and end."""
    from replay.bench import dump
    from replay.soak import soak

    s = load_settings()
    rep = soak(s, seconds=minutes * 60, rate=rate, cards=cards, log=lambda m: console.print(m, markup=False))
    out = Console()
    for k in ("start", "end"):
        out.print(f"{k}: " + json.dumps(rep[k]))
    out.print(f"sent {rep['sent']:,}, processed {rep['processed']:,}, worker alive: {rep['worker_alive']}")
    dump(rep, json_out)


def main() -> None:
    import signal

    # SIGTERM (a supervisor, `kill`) unwinds like Ctrl-C, so the embedded broker, Redis and worker
    # processes a command started are stopped too (a worker's Faust loop installs its own handler).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    app()


if __name__ == "__main__":
    main()
