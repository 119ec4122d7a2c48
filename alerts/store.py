"""The durable alert store: SQLite by default, PostgreSQL when ``CLAIMWATCH_STORE_URL`` says so.

Upserts by ``alert_id`` (deterministic per rule, subject and episode), merging
evidence, so a redelivered batch or a restarted worker never duplicates an
alert. Every query uses bound parameters.

>>> import tempfile, os
>>> from alerts.model import Alert
>>> st = AlertStore("sqlite:///" + os.path.join(tempfile.mkdtemp(), "a.db"))
>>> a = Alert(alert_id="A-1", rule="card_hopping", severity="high", subject_type="card", subject_id="C1",
...           window_start="2026-11-24T09:00:00+08:00", window_end="2026-11-24T18:00:00+08:00",
...           evidence_event_ids=["E1"], run_id="r1")
>>> st.upsert([a]), st.upsert([a]), len(st.query(run_id="r1"))
(1, 1, 1)
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import msgspec
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from alerts.model import Alert, from_json, now_iso, to_json

metadata = sa.MetaData()
alerts_table = sa.Table(
    "alerts", metadata,
    sa.Column("alert_id", sa.String(64), primary_key=True),
    sa.Column("run_id", sa.String(128), nullable=False, index=True),
    sa.Column("rule", sa.String(64), nullable=False, index=True),
    sa.Column("severity", sa.String(16), nullable=False),
    sa.Column("subject_type", sa.String(16), nullable=False),
    sa.Column("subject_id", sa.String(256), nullable=False, index=True),
    sa.Column("window_start", sa.String(40), nullable=False),
    sa.Column("window_end", sa.String(40), nullable=False),
    sa.Column("window_end_ts", sa.Float, nullable=False, index=True),
    sa.Column("detected_at", sa.String(40), nullable=False),
    sa.Column("updated_at", sa.String(40), nullable=False),
    sa.Column("status", sa.String(32), nullable=False, server_default="open"),
    sa.Column("suppressed", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("doc", sa.Text, nullable=False),
)


class AlertStore:
    """Alerts keyed by ``alert_id``; see the module docstring."""

    def __init__(self, url: str) -> None:
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self.engine = sa.create_engine(url, connect_args={"timeout": 30})

            @sa.event.listens_for(self.engine, "connect")
            def _pragmas(conn, _rec):  # WAL: readers never block the writing worker
                cur = conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()
        else:
            if url.startswith("postgresql://"):
                url = "postgresql+psycopg://" + url[len("postgresql://"):]
            self.engine = sa.create_engine(url, pool_pre_ping=True)
        metadata.create_all(self.engine)
        self._migrate()
        self.url = url

    def _migrate(self) -> None:
        """Bring a store written by an older claimwatch up to this schema (idempotent)."""
        cols = {c["name"] for c in sa.inspect(self.engine).get_columns("alerts")}
        if "window_end_ts" not in cols:
            with self.engine.begin() as conn:
                conn.execute(sa.text("ALTER TABLE alerts ADD COLUMN window_end_ts FLOAT NOT NULL DEFAULT 0"))
                rows = conn.execute(sa.select(alerts_table.c.alert_id, alerts_table.c.window_end)).all()
                for aid, we in rows:
                    conn.execute(sa.update(alerts_table).where(alerts_table.c.alert_id == aid)
                                 .values(window_end_ts=_ts(we)))
                conn.execute(sa.text("CREATE INDEX IF NOT EXISTS ix_alerts_window_end_ts ON alerts (window_end_ts)"))

    def _insert(self):
        return (postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert)(alerts_table)

    def upsert(self, alerts: Sequence[Alert]) -> int:
        """Insert or update; evidence of an existing alert is merged, its first ``detected_at`` kept."""
        if not alerts:
            return 0
        latest: dict[str, Alert] = {a.alert_id: a for a in alerts}
        now = now_iso()
        with self.engine.begin() as conn:
            old = {r.alert_id: r for r in conn.execute(
                sa.select(alerts_table.c.alert_id, alerts_table.c.doc, alerts_table.c.detected_at,
                          alerts_table.c.status)
                .where(alerts_table.c.alert_id.in_(list(latest))))}
            rows = []
            for aid, a in latest.items():
                if aid in old:
                    prev = from_json(old[aid].doc)
                    ev = list(dict.fromkeys([*prev.evidence_event_ids, *a.evidence_event_ids]))
                    keep = {k: prev.metrics[k] for k in ("verdict", "priority") if k in prev.metrics}
                    a = msgspec.structs.replace(
                        a, evidence_event_ids=ev, detected_at=prev.detected_at or a.detected_at,
                        metrics={**a.metrics, **keep},
                        window_start=min(prev.window_start, a.window_start, key=_ts),
                        window_end=max(prev.window_end, a.window_end, key=_ts), status=old[aid].status)
                rows.append({
                    "alert_id": aid, "run_id": a.run_id, "rule": a.rule, "severity": a.severity,
                    "subject_type": a.subject_type, "subject_id": a.subject_id,
                    "window_start": a.window_start, "window_end": a.window_end, "window_end_ts": _ts(a.window_end),
                    "detected_at": a.detected_at or now, "updated_at": now, "status": a.status,
                    "suppressed": a.suppressed, "doc": to_json(a).decode(),
                })
            stmt = self._insert()
            stmt = stmt.on_conflict_do_update(
                index_elements=[alerts_table.c.alert_id],
                set_={c: stmt.excluded[c] for c in ("severity", "window_start", "window_end", "window_end_ts",
                                                    "updated_at", "doc", "suppressed")})
            conn.execute(stmt, rows)
        return len(rows)

    def query(self, *, run_id: str | None = None, rule: str | None = None, severity: str | None = None,
              subject_id: str | None = None, status: str | None = None, since: str | None = None,
              until: str | None = None, limit: int | None = None) -> list[Alert]:
        return list(self.iter(run_id=run_id, rule=rule, severity=severity, subject_id=subject_id, status=status,
                              since=since, until=until, limit=limit))

    def iter(self, *, run_id: str | None = None, rule: str | None = None, severity: str | None = None,
             subject_id: str | None = None, status: str | None = None, since: str | None = None,
             until: str | None = None, limit: int | None = None) -> Iterator[Alert]:
        t = alerts_table.c
        q = sa.select(t.doc, t.status).order_by(t.window_end, t.alert_id)
        for col, val in ((t.run_id, run_id), (t.rule, rule), (t.severity, severity), (t.subject_id, subject_id),
                         (t.status, status)):
            if val is not None:
                q = q.where(col == val)
        if since is not None:
            q = q.where(t.window_end_ts >= parse_instant(since, "since"))
        if until is not None:
            q = q.where(t.window_end_ts < parse_instant(until, "until"))
        if limit is not None:
            q = q.limit(int(limit))
        with self.engine.connect() as conn:
            for row in conn.execute(q):
                a = from_json(row.doc)
                yield msgspec.structs.replace(a, status=row.status)

    def count(self, run_id: str | None = None) -> int:
        q = sa.select(sa.func.count()).select_from(alerts_table)
        if run_id is not None:
            q = q.where(alerts_table.c.run_id == run_id)
        with self.engine.connect() as conn:
            return int(conn.execute(q).scalar_one())

    def delete_run(self, run_id: str) -> int:
        with self.engine.begin() as conn:
            return conn.execute(sa.delete(alerts_table).where(alerts_table.c.run_id == run_id)).rowcount

    def set_verdict(self, alert_id: str, verdict: str, author: str, at: str, note: str | None = None) -> Alert | None:
        """Record an inspector's verdict in the alert's document (``metrics["verdict"]``).

        Returns the alert as it was before (what a model learns from), or None when there is no such alert.
        """
        t = alerts_table.c
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(t.doc, t.status).where(t.alert_id == alert_id)).first()
            if row is None:
                return None
            a = msgspec.structs.replace(from_json(row.doc), status=row.status)
            v = {"verdict": verdict, "author": author, "at": at, **({"note": note} if note else {})}
            doc = msgspec.structs.replace(a, metrics={**a.metrics, "verdict": v})
            conn.execute(sa.update(alerts_table).where(t.alert_id == alert_id)
                         .values(doc=to_json(doc).decode(), updated_at=now_iso()))
        return a

    def set_priority(self, priorities: Mapping[str, float]) -> int:
        """Store each alert's priority (``metrics["priority"]``, 0-1); return how many alerts were updated."""
        if not priorities:
            return 0
        t = alerts_table.c
        n = 0
        with self.engine.begin() as conn:
            rows = conn.execute(sa.select(t.alert_id, t.doc).where(t.alert_id.in_(list(priorities)))).all()
            for r in rows:
                a = from_json(r.doc)
                p = round(float(priorities[r.alert_id]), 6)
                if a.metrics.get("priority") == p:
                    continue
                a = msgspec.structs.replace(a, metrics={**a.metrics, "priority": p})
                conn.execute(sa.update(alerts_table).where(t.alert_id == r.alert_id).values(doc=to_json(a).decode()))
                n += 1
        return n

    def close(self) -> None:
        self.engine.dispose()


def parse_instant(value: str, name: str) -> float:
    """An ISO 8601 date or date-time (+08:00 when it has no offset) as epoch seconds; ValueError names the option.

    >>> parse_instant("2026-11-24T09:00:00+08:00", "since") == parse_instant("2026-11-24T01:00:00Z", "since")
    True
    """
    from datetime import datetime, timedelta, timezone

    try:
        dt = datetime.fromisoformat(value.strip())
    except (ValueError, AttributeError):
        raise ValueError(f"--{name} must be an ISO 8601 date or date-time, got {value!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone(timedelta(hours=8)))
    return dt.timestamp()


def _ts(s: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(s).timestamp()


def write_jsonl(alerts: Iterable[Alert], fh) -> int:
    n = 0
    for a in alerts:
        fh.write(to_json(a) + b"\n")
        n += 1
    return n
