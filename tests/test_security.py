"""Security (issue 5): nothing let in.

(a) the embedded broker and Redis (and a worker's web server) listen on 127.0.0.1 only, and
    Redis refuses clients without its (random, per start) password;
(b) SQL-injection strings through every filter of ``claimwatch alerts export`` match nothing
    they should not, and the alert table survives;
(c) run ids that could escape a namespace (``../x``, ``a/b``, absolute paths ...) are refused
    by ``check_run_id`` and ``claimwatch replay``; ``--alerts-out`` / ``--out`` naming a
    directory is refused with a clear message;
(d) a settlement's text fields (markup, SQL, bidi marks, emoji, control characters) pass
    through the real pipeline (broker, worker, Redis, store) and come out of the export
    verbatim;
(e) no secret in the repository, no default password in the settings.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import socket
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta, timezone
from pathlib import Path

import orjson
import pytest
import redis

from tests.conftest import ROOT
from tests.helpers import T0, dumps, make_event, run_cli

TZ = timezone(timedelta(hours=8))


# --------------------------------------------------------------------------- (a) loopback only, Redis password

def _session_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        stat = fh.read()
    return int(stat[stat.rindex(b")") + 2:].split()[3])


def _pids_in_session(sid: int) -> set[int]:
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if _session_of(int(d)) == sid:
                    out.add(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return out


def _socket_inodes(pids: set[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            pass
    return inodes


def _addr(hexaddr: str) -> str:
    ip, port = hexaddr.split(":")
    raw = bytes.fromhex(ip)
    if len(raw) == 4:
        return f"{socket.inet_ntop(socket.AF_INET, raw[::-1])}:{int(port, 16)}"
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return f"[{socket.inet_ntop(socket.AF_INET6, words)}]:{int(port, 16)}"


def listening(pids: set[int]) -> list[tuple[str, str]]:
    """(file, local address) of every listening TCP socket owned by ``pids``."""
    inodes = _socket_inodes(pids)
    out = []
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            f = ln.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A = LISTEN
                out.append((name, _addr(f[1])))
    return out


def test_embedded_services_listen_on_loopback_only_and_redis_needs_its_password(tmp_path):
    from stream.embedded import EmbeddedStack

    st = EmbeddedStack(workdir=tmp_path / "stack").start()
    try:
        procs = {p.name: p.proc for p in st._procs}
        assert set(procs) == {"tansu", "redis"}
        kafka_port = int(st.kafka_url.rsplit(":", 1)[1])
        redis_port = int(st.redis_url.rsplit(":", 1)[1].split("/")[0])
        assert st.kafka_url.startswith("kafka://127.0.0.1:") and "@127.0.0.1:" in st.redis_url
        for name, proc in procs.items():
            socks = listening(_pids_in_session(_session_of(proc.pid)))
            assert socks, f"{name}: no listening socket found for pid {proc.pid}"
            wrong = [s for s in socks if s[0] != "tcp" or not s[1].startswith("127.0.0.1:")]
            assert not wrong, f"{name} listens beyond loopback: {wrong} (all: {socks})"
            port = kafka_port if name == "tansu" else redis_port
            assert ("tcp", f"127.0.0.1:{port}") in socks
        # Redis: no password, a wrong one -> refused; the URL's random password -> served
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=redis_port, socket_timeout=5).ping()
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=redis_port, password="x" + uuid.uuid4().hex, socket_timeout=5).ping()
        r = redis.Redis.from_url(st.redis_url)
        assert r.ping() is True
        assert r.config_get("protected-mode") == {"protected-mode": "yes"}
        assert r.config_get("bind")["bind"].split() == ["127.0.0.1"]
        r.close()
        secret = redis.connection.parse_url(st.redis_url)["password"]
        assert len(secret) >= 32, "the embedded Redis password must be long and random"
    finally:
        st.stop()


def test_each_embedded_redis_gets_its_own_password(stack, tmp_path):
    from stream.embedded import EmbeddedStack

    st = EmbeddedStack(workdir=tmp_path / "s2", kafka=False).start()
    try:
        a = redis.connection.parse_url(st.redis_url)["password"]
        b = redis.connection.parse_url(stack.redis_url)["password"]
        assert a and b and a != b
    finally:
        st.stop()


def test_worker_web_server_listens_on_loopback_only(worker):
    socks = listening(_pids_in_session(_session_of(worker.proc.pid)))
    assert ("tcp", f"127.0.0.1:{worker.web_port}") in socks, socks
    wrong = [s for s in socks if s[0] != "tcp" or not s[1].startswith("127.0.0.1:")]
    assert not wrong, f"the worker listens beyond loopback: {wrong}"


# --------------------------------------------------------------------------- (b) SQL injection through every filter

INJECTIONS = [
    "' OR '1'='1",
    "x'; DROP TABLE alerts; --",
    '" OR 1=1 --',
    "%' UNION SELECT doc, status FROM alerts --",
]
MORE_INJECTIONS = INJECTIONS + [
    "r1' --", "*", "%", "_", "1; DELETE FROM alerts", "') OR ('a'='a", "\\' OR 1=1 #", "r1\x00' OR 1=1",
    "'; UPDATE alerts SET severity='low'; --", "' OR rule LIKE '%", "2026-11-01' OR '1'='1",
]
FILTERS = ["--run-id", "--rule", "--severity", "--subject", "--since", "--until"]
EVIL_SUBJECT = "' OR '1'='1"


def _alert(aid: str, run: str, rule: str, sev: str, subject: str, end: str):
    from alerts.model import Alert

    return Alert(alert_id=aid, rule=rule, severity=sev, subject_type="card", subject_id=subject,
                 window_start="2026-11-01T08:00:00+08:00", window_end=end, evidence_event_ids=["E1", "E2"],
                 run_id=run, summary="卡 X 在 24 小时内于 13 家定点医药机构结算")


@pytest.fixture
def small_store(tmp_path, cli_env):
    """A temporary SQLite store with five alerts (one whose subject is an injection string)."""
    from alerts.store import AlertStore

    url = f"sqlite:///{tmp_path / 'sec' / 'alerts.db'}"
    st = AlertStore(url)
    st.upsert([
        _alert("A-1", "r1", "card_hopping", "high", "C1", "2026-11-02T07:00:00+08:00"),
        _alert("A-2", "r1", "shared_card", "medium", "C2", "2026-11-03T09:00:00+08:00"),
        _alert("A-3", "r1", "card_ring", "critical", "RING-P1-XC10AA", "2026-11-04T09:00:00+08:00"),
        _alert("A-4", "r2", "overdispensing", "low", "C4", "2026-11-05T09:00:00+08:00"),
        _alert("A-5", "r2", "card_hopping", "high", EVIL_SUBJECT, "2026-11-06T09:00:00+08:00"),
    ])
    docs = {a.alert_id: a for a in st.query()}
    st.close()
    env = dict(cli_env, CLAIMWATCH_STORE_URL=url)
    return url, env, docs


def _flat(stderr: bytes) -> str:
    """The CLI's stderr with rich's line wrapping undone."""
    return " ".join(stderr.decode("utf-8", "replace").split())


def _export(env, *args) -> tuple[int, list[dict], str]:
    p = run_cli("alerts", "export", *args, env=env, timeout=120)
    lines = [json.loads(x) for x in p.stdout.decode().splitlines() if x.strip()]
    return p.returncode, lines, _flat(p.stderr)


def _table_intact(url: str, docs: dict) -> None:
    import sqlalchemy as sa

    from alerts.store import AlertStore

    st = AlertStore(url)
    try:
        assert st.count() == len(docs), "rows were added or deleted"
        now = {a.alert_id: a for a in st.query()}
        assert now == docs, "alert rows were modified"
        with st.engine.connect() as conn:
            tables = {r[0] for r in conn.execute(sa.text("SELECT name FROM sqlite_master WHERE type='table'"))}
        assert tables == {"alerts"}, tables
    finally:
        st.close()


def test_injection_strings_in_every_text_filter_match_nothing_and_the_table_survives(small_store):
    url, env, docs = small_store
    cases = [(f, inj) for f in ("--run-id", "--rule", "--severity", "--subject") for inj in INJECTIONS]
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda c: (c, _export(env, c[0], c[1])), cases))
    wrong = []
    for (flt, inj), (rc, lines, err) in results:
        want = ["A-5"] if (flt == "--subject" and inj == EVIL_SUBJECT) else []
        got = [a["alert_id"] for a in lines]
        if rc != 0 or got != want:
            wrong.append(f"{flt} {inj!r}: exit {rc}, alerts {got} (want {want}) {err[-200:]}")
    assert not wrong, "\n".join(wrong)
    _table_intact(url, docs)


def test_injection_strings_in_time_filters_are_refused_not_compared_as_text(small_store):
    """--since/--until take ISO times; an injection string must not act as a filter (it is no time)."""
    url, env, docs = small_store
    cases = [(f, inj) for f in ("--since", "--until") for inj in INJECTIONS]
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda c: (c, _export(env, c[0], c[1])), cases))
    wrong = []
    for (flt, inj), (rc, lines, err) in results:
        if rc == 0 or lines:
            wrong.append(f"{flt} {inj!r}: exit {rc}, {len(lines)} alert(s) exported "
                         f"{[a['alert_id'] for a in lines]} instead of an error naming {flt}")
        elif flt.lstrip("-") not in err:
            wrong.append(f"{flt} {inj!r}: refused, but the message does not name the option: {err[-200:]}")
    _table_intact(url, docs)
    assert not wrong, "\n".join(wrong)


def test_time_filters_compare_instants_not_strings(small_store):
    """A-1 ends at 2026-11-02T07:00+08:00 = 2026-11-01T23:00Z: before 2026-11-02T00:00Z."""
    url, env, docs = small_store
    rc1, since, err1 = _export(env, "--since", "2026-11-02T00:00:00+00:00", "--run-id", "r1")
    rc2, until, err2 = _export(env, "--until", "2026-11-02T00:00:00Z", "--run-id", "r1")
    assert rc1 == 0 and rc2 == 0, err1 + err2
    assert [a["alert_id"] for a in since] == ["A-2", "A-3"], "--since compared the text, not the instant"
    assert [a["alert_id"] for a in until] == ["A-1"], "--until compared the text, not the instant"


def test_store_query_binds_every_filter(small_store):
    """The whole injection list straight through AlertStore.query (every keyword filter)."""
    from alerts.store import AlertStore

    url, _, docs = small_store
    st = AlertStore(url)
    try:
        for inj in MORE_INJECTIONS:
            for kw in ("run_id", "rule", "severity", "subject_id", "status"):
                got = [a.alert_id for a in st.query(**{kw: inj})]
                want = ["A-5"] if (kw == "subject_id" and inj == EVIL_SUBJECT) else []
                assert got == want, f"{kw}={inj!r} matched {got}"
    finally:
        st.close()
    _table_intact(url, docs)


# --------------------------------------------------------------------------- (c) path traversal

BAD_RUN_IDS = ["../x", "..", ".", "a/b", "/etc/passwd", "/tmp/x", "x/../../y", "..\\x", "a\\b", "", "live",
               "x\n", "x\r\n", "x\x00y", "ｘ／ｙ", "\u2215etc", "-x", "a" * 65, "~root", "%2e%2e%2f", "a b", "x:y",
               "x*", "{x}", "x\t"]
CLI_BAD_RUN_IDS = ["../x", "a/b", "..", "/tmp/abs-run"]


@pytest.mark.parametrize("rid", BAD_RUN_IDS, ids=[repr(r) for r in BAD_RUN_IDS])
def test_check_run_id_refuses_escaping_ids(rid):
    from replay.runner import ReplayError, check_run_id

    with pytest.raises(ReplayError, match="invalid run id"):
        check_run_id(rid)


def test_check_run_id_accepts_plain_ids():
    from replay.runner import check_run_id

    for rid in ("case-2026-11", "a.b_c", "A1", "x" * 64):
        assert check_run_id(rid) == rid


def test_replay_refuses_escaping_run_ids_before_doing_anything(cli_env, tmp_path, redis_sync):
    f = tmp_path / "one.jsonl"
    f.write_bytes(dumps(make_event()) + b"\n")
    before = sorted(p.name for p in tmp_path.iterdir())

    def go(rid):
        return rid, run_cli("replay", str(f), "--run-id", rid, "--workers", "0", "--idle-timeout", "5",
                            "--alerts-out", str(tmp_path / "out.jsonl"), env=cli_env, cwd=tmp_path, timeout=120)

    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(go, CLI_BAD_RUN_IDS))
    wrong = []
    for rid, p in results:
        err = _flat(p.stderr)
        if p.returncode == 0 or "invalid run id" not in err:
            wrong.append(f"{rid!r}: exit {p.returncode}: {err[-300:]}")
        if list(redis_sync.scan_iter(match=f"cw:{rid}:*", count=1000)):
            wrong.append(f"{rid!r}: Redis keys were written for it")
    assert not wrong, "\n".join(wrong)
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a file was written"
    assert not Path("/tmp/abs-run").exists()


def test_output_paths_that_are_directories_are_refused_with_a_clear_message(cli_env, tmp_path):
    f = tmp_path / "one.jsonl"
    f.write_bytes(dumps(make_event()) + b"\n")
    d = tmp_path / "outdir"
    d.mkdir()
    with ThreadPoolExecutor(2) as ex:
        rp = ex.submit(run_cli, "replay", str(f), "--run-id", "dir-out", "--workers", "0", "--alerts-out", str(d),
                       env=cli_env, timeout=120)
        ep = ex.submit(run_cli, "alerts", "export", "--out", str(d), env=cli_env, timeout=120)
        rp, ep = rp.result(), ep.result()
    assert rp.returncode == 2, _flat(rp.stderr)
    assert "--alerts-out" in _flat(rp.stderr) and "is a directory" in _flat(rp.stderr)
    assert ep.returncode == 2, _flat(ep.stderr)
    assert "--out" in _flat(ep.stderr) and "is a directory" in _flat(ep.stderr)
    assert list(d.iterdir()) == []


# --------------------------------------------------------------------------- (d) text stored and exported verbatim

HOSTILE_TEXT = [
    "<script>alert(1)</script>",
    "'; DROP TABLE alerts; --",
    "\u202eevil.exe\u202c \u200f右到左\u200e",
    "💊🏥👨\u200d⚕️ 🇨🇳",
    "tab\there\x01\x07\x1b[31mred\x1b[0m\x7f",
    "&lt;b&gt; &amp; <img src=x onerror=alert(1)>",
    "{{7*7}} ${jndi:ldap://x/a} %s %n \\u0000",
    "line\u2028sep\u2029para\r\nend",
]
CARD = "<b>卡</b>"
SELLER = "<script>alert('药房')</script>"


def _hostile_events(tag: str) -> list[dict]:
    evs = []
    for k in range(13):  # one card at 13 institutions in a day: card_hopping
        evs.append(make_event(CARD, f"<i>P{k:02d}</i>&{tag}", T0 + k * 1800, event_id=f"SEC-{tag}-{k:02d}",
                              institution_name=HOSTILE_TEXT[k % len(HOSTILE_TEXT)],
                              department=HOSTILE_TEXT[(k + 3) % len(HOSTILE_TEXT)],
                              vendor_note=HOSTILE_TEXT[(k + 5) % len(HOSTILE_TEXT)]))
    code = "8" + str(uuid.uuid4().int)[:19]
    item = {"code": "XC10AAA005", "name": HOSTILE_TEXT[0], "category": "drug", "quantity": 1, "amount": 50.0,
            "days_supply": 30, "trace_codes": [code]}
    # one package settled twice: trace_code_reuse blames the institution of the second settlement
    evs.append(make_event("CARD-A", "P-FIRST", T0 + 100, event_id=f"SEC-{tag}-T1", items=[item],
                          total_amount=50.0, fund_paid=35.0, self_paid=15.0))
    evs.append(make_event("CARD-B", SELLER, T0 + 7200, event_id=f"SEC-{tag}-T2", items=[item],
                          institution_name=HOSTILE_TEXT[2], total_amount=50.0, fund_paid=35.0, self_paid=15.0))
    return evs


def test_text_fields_pass_through_the_processor_verbatim(process):
    from detectors.config import load_rules

    tag = uuid.uuid4().hex[:6]
    evs = _hostile_events(tag)
    raws = [dumps(e) for e in evs]
    [res] = process(load_rules(ROOT / "configs" / "rules.yaml"), [raws], "sec" + tag)
    assert res.dead_letters == [], [d.reason for d in res.dead_letters]
    assert sum(res.processed.values()) == len(raws)
    hop = [a for a in res.alerts if a.rule == "card_hopping"]
    assert [a.subject_id for a in hop] == [CARD]
    assert CARD in hop[0].summary and CARD in hop[0].summary_en
    reuse = [a for a in res.alerts if a.rule == "trace_code_reuse"]
    assert [a.subject_id for a in reuse] == [SELLER]


def test_text_fields_are_stored_and_exported_verbatim_end_to_end(worker, cli_env, tmp_path):
    """Broker, worker, Redis, alert store and both exports: the strings come back byte for byte."""
    tag = uuid.uuid4().hex[:6]
    run = f"sec-{tag}"
    evs = _hostile_events(tag)
    src = tmp_path / "hostile.jsonl"
    src.write_bytes(b"".join(dumps(e) + b"\n" for e in evs))
    out = tmp_path / "alerts.jsonl"
    p = run_cli("replay", str(src), "--run-id", run, "--workers", "0", "--alerts-out", str(out), env=cli_env,
                timeout=300)
    err = _flat(p.stderr)
    assert p.returncode == 0, err
    assert re.search(r"\b0 invalid lines skipped", err), f"a hostile-text settlement was refused:\n{err}"
    assert f"{len(evs)} processed" in err.replace(",", ""), err

    e = run_cli("alerts", "export", "--run-id", run, env=cli_env, timeout=120)
    assert e.returncode == 0, e.stderr.decode()
    for name, blob in (("replay --alerts-out", out.read_bytes()), ("alerts export", e.stdout)):
        lines = blob.splitlines()
        docs = [json.loads(x) for x in lines]
        subjects = {d["rule"]: d["subject_id"] for d in docs}
        assert subjects.get("card_hopping") == CARD, f"{name}: {subjects}"
        assert subjects.get("trace_code_reuse") == SELLER, f"{name}: {subjects}"
        # byte-identical: raw UTF-8, no HTML escaping (\u003c), no \\u escapes of CJK
        assert f'"subject_id":"{CARD}"'.encode() in blob, f"{name}: {CARD!r} not verbatim in the JSONL"
        assert f'"subject_id":"{SELLER}"'.encode() in blob, f"{name}: {SELLER!r} not verbatim in the JSONL"
        assert b"\\u003c" not in blob and b"&lt;b&gt;\xe5\x8d\xa1" not in blob
        hop = next(d for d in docs if d["rule"] == "card_hopping")
        assert CARD in hop["summary"]
        assert sorted(hop["evidence_event_ids"]) == [f"SEC-{tag}-{k:02d}" for k in range(13)]

    c = run_cli("alerts", "export", "--run-id", run, "--format", "csv", env=cli_env, timeout=120)
    assert c.returncode == 0, c.stderr.decode()
    rows = list(csv.DictReader(io.StringIO(c.stdout.decode("utf-8"))))
    assert {r["rule"]: r["subject_id"] for r in rows}.get("card_hopping") == CARD
    assert {r["rule"]: r["subject_id"] for r in rows}.get("trace_code_reuse") == SELLER


def test_hostile_text_settlements_keep_their_original_bytes():
    """What the parser keeps as evidence is the message, byte for byte (every hostile string inside)."""
    from stream.events import parse_event

    for ev in _hostile_events("raw"):
        raw = dumps(ev)
        got = parse_event(raw, future_tolerance_s=10 * 365 * 86400)
        assert got.raw == raw
        assert orjson.loads(got.raw) == ev
        assert got.institution_name == ev.get("institution_name")


# --------------------------------------------------------------------------- (e) secrets

PLACEHOLDERS = {"password", "PASSWORD", "secret", "SECRET", "pw", "change-me", "changeme", "...", "xxx", "****",
                "<password>", "PASS", "pass"}
_KEY = "PRIVATE" + " KEY"
SECRET_PATTERNS = [
    ("private key", re.compile(r"-----BEGIN [A-Z ]*" + _KEY + "-----")),
    ("literal requirepass (redis.conf directive)", re.compile(r"(?m)^[ \t]*requirepass[ \t]+(?P<v>\S+)")),
    ("requirepass on a command line",
     re.compile(r"(?m)^[^#\n]*--requirepass(?:[\"']?[ \t]*,[ \t]*[\"']?|[ \t=]+[\"']?)(?P<v>[^\s\"'`,\]]+)")),
    ("quoted password/secret/token literal", re.compile(
        r"(?i)\b(?:password|passwd|pwd|secret|api[_-]?key|access[_-]?key|auth[_-]?token|token)\b[\"']?\s*"
        r"(?<![=!<>])[:=](?!=)\s*[bfru]?[\"'](?P<v>[^\"'\s$<{}]{4,})[\"']")),
    ("password in an env-style assignment", re.compile(
        r"(?m)^[ \t]*(?:export[ \t]+)?[A-Z0-9_]*(?:PASSWORD|PASSWD|SECRET|TOKEN|API_KEY)[A-Z0-9_]*[ \t]*[=:][ \t]*"
        r"(?P<v>[^\s#$\"'{(]{4,})")),
    ("credentials in a URL", re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@\"'`]*:(?P<v>[^@\s/\"'`]+)@")),
    ("AWS access key", re.compile(r"\bAKIA[0-9A-Z]{16}\b")),
    ("GitHub token", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36}\b")),
    ("Slack token", re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}")),
]


def _tracked() -> list[str]:
    p = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [x for x in p.stdout.decode().split("\0") if x]


def test_no_secret_in_the_tracked_files():
    files = _tracked()
    assert len(files) > 20
    found = []
    for rel in files:
        name = Path(rel).name
        if name == ".env" or name.endswith((".pem", ".key", ".p12", ".pfx", ".jks")) or name.startswith("id_rsa"):
            found.append(f"{rel}: a secret file is tracked")
            continue
        path = ROOT / rel
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if b"\0" in data[:8192] or len(data) > 5_000_000:
            continue
        text = data.decode("utf-8", "replace")
        for what, rx in SECRET_PATTERNS:
            if what.startswith("password in an env-style") and name.endswith(".py"):
                continue  # Python assignments are code; their string literals are checked by the quoted pattern
            for m in rx.finditer(text):
                v = m.groupdict().get("v")
                if v is not None and ({v, v.strip("`'\".,;)")} & (PLACEHOLDERS | {""})
                                      or v.startswith(("$", "{", "<", "%("))):
                    continue
                line = text.count("\n", 0, m.start()) + 1
                found.append(f"{rel}:{line}: {what}: {m.group(0)[:80]!r}")
    assert not found, "possible secrets in tracked files:\n" + "\n".join(found)


def test_secret_patterns_catch_real_leaks():
    """The scan has teeth (samples are assembled at run time so this file never matches itself)."""
    v = "hunter" + "2" * 3
    samples = {
        "private key": "-----BEGIN RSA " + _KEY + "-----",
        "literal requirepass (redis.conf directive)": "require" + "pass " + v,
        "requirepass on a command line": 'command: ["redis-server", "--require' + 'pass", "' + v + '"]',
        "quoted password/secret/token literal": "pass" + 'word = "' + v + '"',
        "requirepass on a command line ": "redis-server --require" + "pass " + v,
        "password in an env-style assignment": "REDIS_PASS" + "WORD=" + v,
        "credentials in a URL": "redis://:" + v + "@redis:6379/0",
        "AWS access key": "AKIA" + "ABCDEFGHIJKLMNOP",
    }
    rx = dict(SECRET_PATTERNS)
    for what, text in samples.items():
        assert rx[what.strip()].search(text), f"{what} does not catch {text!r}"
    for ok in ("redis://:${REDIS_PASSWORD:?set}@redis:6379/0", "pass" + 'word == "' + v + '"',
               "REDIS_PASS" + "WORD=${REDIS_PASSWORD}", "# the --require" + "pass flag"):
        assert not any(r.search(ok) and (r.search(ok).groupdict().get("v") or "x")[:1] not in "${<"
                       for r in rx.values()), ok


def test_gitignore_keeps_env_files_out():
    p = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT)
    assert p.returncode == 0, ".env must be ignored by git"


def test_settings_have_no_default_secrets_and_ignore_a_dotenv_in_the_cwd(monkeypatch, tmp_path):
    from claimwatch.settings import Settings

    for k in list(os.environ):
        if k.startswith("CLAIMWATCH_"):
            monkeypatch.delenv(k)
    leak = "leak" + uuid.uuid4().hex
    (tmp_path / ".env").write_text(f"CLAIMWATCH_REDIS_URL=redis://:{leak}@10.0.0.1:6379/0\n"
                                   f"CLAIMWATCH_KAFKA_URL=kafka://10.0.0.1:9092\n")
    monkeypatch.chdir(tmp_path)
    s = Settings()
    assert s.kafka_url is None and s.redis_url is None and s.store_url is None
    assert leak not in json.dumps(s.model_dump(mode="json"))
    for name, field in Settings.model_fields.items():
        d = field.default
        if isinstance(d, str):
            assert not re.search(r"://[^/\s]*:[^@\s]+@", d), f"{name} has credentials in its default"
            assert "password" not in d.lower() or name == "redis_url", f"{name} default mentions a password"
    assert s.web_bind == "127.0.0.1", "the worker's web server must bind loopback unless configured"
