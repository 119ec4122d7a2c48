"""Fixtures for fault tests: an isolated consumer group and a Redis that can be restarted."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
import uuid

import pytest

from stream.embedded import EmbeddedStack, redis_binary


def wait_ready(w, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert w.alive(), "worker exited:\n" + w.log_tail()
        try:
            body = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{w.web_port}/readyz", timeout=2).read())
            if body.get("partitions_assigned"):
                return
        except OSError:
            pass
        time.sleep(0.3)
    pytest.fail("worker not ready:\n" + w.log_tail())


@pytest.fixture
def isolated(settings, tmp_path):
    """Settings with their own consumer group and replay topic, so the session worker stays out."""
    tag = uuid.uuid4().hex[:8]
    return settings.model_copy(update={"app_id": f"cw-{tag}", "topic_replay": f"settlements-replay-{tag}",
                                       "data_dir": tmp_path / "data", "session_timeout_s": 8.0,
                                       "store_url": f"sqlite:///{tmp_path / 'alerts.db'}"})


class RestartableRedis:
    """A real redis-server with AOF (appendfsync everysec) that a test can stop and start again."""

    def __init__(self, workdir):
        import redis as sync_redis

        self.stack = EmbeddedStack(workdir=workdir, kafka=False).start()
        self.redis_url = self.stack.redis_url
        self.proc = self.stack._procs[0]
        # the embedded Redis runs without persistence; this one keeps its data across the restart, as a
        # production Redis does (AOF), so the test is about the worker riding it out, not about data loss
        r = sync_redis.Redis.from_url(self.redis_url)
        r.config_set("appendonly", "yes")
        deadline = time.monotonic() + 30
        while r.info("persistence").get("aof_rewrite_in_progress") or r.info("persistence").get("aof_rewrite_scheduled"):
            assert time.monotonic() < deadline, "AOF rewrite did not finish"
            time.sleep(0.05)
        r.close()
        argv = list(self.proc.proc.args)
        argv[argv.index("--appendonly") + 1] = "yes"
        self.argv = argv

    def redis_down(self) -> None:
        """Stop redis-server (its AOF stays on disk)."""
        self.proc.stop()

    def redis_up(self) -> None:
        """Start redis-server again on the same port, from its AOF."""
        log = open(self.proc.log, "ab")
        self.proc.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.stack.workdir,
                                          start_new_session=True)
        port = int(self.redis_url.rsplit(":", 1)[1].split("/")[0])
        from stream.embedded import _wait_port

        _wait_port(port, self.proc.proc, "redis", self.proc.log)

    def stop(self):
        self.stack.stop()


@pytest.fixture
def stack_restartable(tmp_path):
    r = RestartableRedis(tmp_path / "redis")
    yield r
    r.stop()


__all__ = ["wait_ready", "redis_binary"]


class RestartableBroker:
    """A real Tansu broker that a test can stop and start again on the same port (memory storage:
    topics and offsets are gone after the restart, as after losing a single-node broker's disk)."""

    def __init__(self, workdir):
        self.stack = EmbeddedStack(workdir=workdir, redis=False).start()
        self.kafka_url = self.stack.kafka_url
        self.proc = self.stack._procs[0]
        self.argv = self.proc.proc.args

    def stop_broker(self) -> None:
        self.proc.stop()

    def start_broker(self) -> None:
        from stream.embedded import _wait_port

        log = open(self.proc.log, "ab")
        self.proc.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.stack.workdir,
                                          start_new_session=True)
        port = int(self.kafka_url.rsplit(":", 1)[1])
        _wait_port(port, self.proc.proc, "tansu", self.proc.log)

    def stop(self):
        self.stack.stop()


@pytest.fixture
def broker_restartable(tmp_path):
    b = RestartableBroker(tmp_path / "broker")
    yield b
    b.stop()
