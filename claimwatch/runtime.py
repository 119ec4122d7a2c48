"""Start what a command needs: the embedded services when no URL is configured, and worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from claimwatch.settings import Settings
from stream.embedded import EmbeddedStack, free_port


@contextmanager
def services(settings: Settings, workdir: Path | None = None) -> Iterator[Settings]:
    """Yield settings whose broker and Redis URLs are set, starting embedded ones as needed."""
    need_kafka = not settings.kafka_url
    need_redis = not settings.redis_url
    # with an embedded Redis, the aux rules get their own embedded one (a second core), unless one is configured
    need_aux = need_redis and not settings.redis_aux_url and bool(settings.redis_aux_rules)
    if not (need_kafka or need_redis):
        yield settings
        return
    stack = EmbeddedStack(workdir=workdir, kafka=need_kafka, redis=need_redis, redis_aux=need_aux).start()
    try:
        upd = {}
        if need_kafka:
            upd["kafka_url"] = stack.kafka_url
        if need_redis:
            upd["redis_url"] = stack.redis_url
        if need_aux:
            upd["redis_aux_url"] = stack.redis_aux_url
        yield settings.model_copy(update=upd)
    finally:
        stack.stop()


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a child process the same settings."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        if value is None:
            env.pop(f"CLAIMWATCH_{name.upper()}", None)
        else:
            env[f"CLAIMWATCH_{name.upper()}"] = str(value)
    return env


class WorkerProcess:
    """A ``claimwatch worker`` child process with its own web port."""

    def __init__(self, settings: Settings, *, index: int = 0, log_dir: Path | None = None,
                 web_port: int | None = None) -> None:
        self.web_port = web_port or free_port()
        log_dir = Path(log_dir or settings.data_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"worker-{index}.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "claimwatch", "worker", "--web-port", str(self.web_port)],
            env=settings_env(settings), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
            except ProcessLookupError:
                pass
        self._log.close()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@contextmanager
def workers(settings: Settings, n: int, log_dir: Path | None = None) -> Iterator[list[WorkerProcess]]:
    procs = [WorkerProcess(settings, index=i, log_dir=log_dir) for i in range(n)]
    try:
        time.sleep(0.2)
        yield procs
    finally:
        for p in procs:
            p.stop()
