"""The ``claimwatch`` command line (typer + rich)."""

from __future__ import annotations

import asyncio
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
app.add_typer(alerts_app, name="alerts")
app.add_typer(rules_app, name="rules")

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
           idle_timeout: float = typer.Option(120.0, help="give up when no event is processed for this long (s)")) -> None:
    """Replay a settlements file through the broker and workers; write its alerts."""
    from alerts.store import AlertStore, write_jsonl
    from claimwatch import runtime
    from replay.runner import ReplayError, ReplayStats, check_run_id, drop_run_state, publish_file, wait_done

    s = load_settings()
    try:
        check_run_id(run_id)
    except ReplayError as exc:
        fail(str(exc))
    if not file.is_file():
        fail(f"no such file: {file}")
    if alerts_out is not None and alerts_out.is_dir():
        fail(f"--alerts-out {alerts_out} is a directory; give a file name")
    if workers == 0 and (not s.kafka_url or not s.redis_url):
        fail("--workers 0 needs running workers, so CLAIMWATCH_KAFKA_URL and CLAIMWATCH_REDIS_URL must be set")
    stats = ReplayStats(run_id)
    t0 = time.perf_counter()
    with runtime.services(s) as s2, runtime.workers(s2, workers) as procs, _progress() as prog:
        tasks: dict[str, int] = {}

        def on_progress(stage: str, done: int, total: int | None) -> None:
            name = {"publish": "publishing lines", "process": "processed events"}[stage]
            if stage not in tasks:
                tasks[stage] = prog.add_task(name, total=total)
            prog.update(tasks[stage], completed=done, total=total)

        store = AlertStore(s2.store_url_resolved)
        try:
            if store.count(run_id):
                store.delete_run(run_id)  # a run id replayed again starts clean
            asyncio.run(drop_run_state(s2.redis_url, run_id))
            asyncio.run(publish_file(s2, file, run_id, stats, on_progress))
            alive = (lambda: any(p.alive() for p in procs)) if procs else None
            asyncio.run(wait_done(s2, run_id, stats, idle_timeout_s=idle_timeout, progress=on_progress, alive=alive))
        except ReplayError as exc:
            for p in procs:
                console.print(f"[dim]worker log {p.log_path}:[/]\n{p.log_tail(2000)}")
            fail(str(exc), 1)
        stats.seconds = time.perf_counter() - t0
        alerts = store.query(run_id=run_id)
        stats.alerts = len(alerts)
        if alerts_out is not None:
            alerts_out.parent.mkdir(parents=True, exist_ok=True)
            with open(alerts_out, "wb") as fh:
                write_jsonl(alerts, fh)
        if not keep_state:
            asyncio.run(drop_run_state(s2.redis_url, run_id))
        store.close()
    console.print(f"run [bold]{run_id}[/]: {stats.lines:,} lines, {stats.published:,} published, "
                  f"{stats.blank:,} blank and {stats.invalid:,} invalid lines skipped (invalid ones sent to "
                  f"{s.topic_dlq}), {stats.processed:,} processed, {stats.alerts:,} alerts in {stats.seconds:.1f} s")
    for ex in stats.invalid_examples:
        console.print(f"  [yellow]invalid[/] {ex}")
    if alerts_out is not None:
        console.print(f"alerts written to {alerts_out}")


@alerts_app.command("export")
def alerts_export(run_id: Optional[str] = typer.Option(None, "--run-id"),
                  rule: Optional[str] = typer.Option(None, "--rule"),
                  severity: Optional[str] = typer.Option(None, "--severity"),
                  subject: Optional[str] = typer.Option(None, "--subject", help="card, physician, institution or ring id"),
                  since: Optional[str] = typer.Option(None, help="window_end ≥ this ISO time"),
                  until: Optional[str] = typer.Option(None, help="window_end < this ISO time"),
                  fmt: str = typer.Option("jsonl", "--format", help="jsonl (the contract) or csv"),
                  out: Optional[Path] = typer.Option(None, "--out", help="file to write (default: stdout)")) -> None:
    """Export alerts from the store as JSON Lines (one alert per line, alert.schema.json)."""
    from alerts.model import to_dict
    from alerts.store import AlertStore, write_jsonl

    s = load_settings()
    if fmt not in ("jsonl", "csv"):
        fail(f"--format must be jsonl or csv, got {fmt!r}")
    store = AlertStore(s.store_url_resolved)
    it = store.iter(run_id=run_id, rule=rule, severity=severity, subject_id=subject, since=since, until=until)
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
