"""Shared fixtures: the real embedded broker and Redis (one per session), settings, a running worker."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest
import redis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from claimwatch.settings import Settings  # noqa: E402
from stream.embedded import EmbeddedStack  # noqa: E402

# The contract lives in the steering repo's shared/ (beside this checkout, as in CI); a copy taken
# from it is kept in tests/data/contract for checkouts without shared/ next to them.
CONTRACT = next(p for p in (Path(os.environ.get("CLAIMWATCH_CONTRACT_DIR", "/nonexistent")),
                            ROOT.parent / "shared" / "contract", ROOT / "tests" / "data" / "contract")
                if (p / "settlement-event.schema.json").exists())

pytest_plugins = ["tests.helpers"]


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """A real Tansu broker and a real Redis server on loopback for the whole session."""
    s = EmbeddedStack(workdir=tmp_path_factory.mktemp("stack")).start()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def aux_redis(tmp_path_factory):
    """A second real Redis server (the aux Redis of ``CLAIMWATCH_REDIS_AUX_URL``) for the whole session."""
    s = EmbeddedStack(workdir=tmp_path_factory.mktemp("aux"), kafka=False).start()
    yield s.redis_url
    s.stop()


@pytest.fixture(scope="session")
def settings(stack, tmp_path_factory) -> Settings:
    data = tmp_path_factory.mktemp("data")
    return Settings(kafka_url=stack.kafka_url, redis_url=stack.redis_url, data_dir=data,
                    store_url=f"sqlite:///{data / 'alerts.db'}", topic_partitions=4)


@pytest.fixture(scope="session")
def redis_sync(stack):
    r = redis.Redis.from_url(stack.redis_url)
    yield r
    r.close()


@pytest.fixture
def process(stack):
    """Run batches through a real :class:`stream.pipeline.Processor` on the session Redis."""
    import redis.asyncio as aioredis

    from stream.pipeline import Message, Processor

    def run(rules, batches, run_id: str):
        async def go():
            r = aioredis.from_url(stack.redis_url)
            try:
                proc = Processor(rules, r, future_tolerance_s=10 * 365 * 86400)
                results = []
                for batch in batches:
                    msgs = [Message(v, {"cw-run-id": run_id.encode()}, "settlements-replay", 0, i)
                            for i, v in enumerate(batch)]
                    results.append(await proc.process(msgs))
                return results
            finally:
                await r.aclose()
        return asyncio.run(go())
    return run


@pytest.fixture(scope="session")
def worker(settings):
    """One real ``claimwatch worker`` process for the session (consumes live and replay topics)."""
    from claimwatch.runtime import WorkerProcess
    from stream.topics import ensure_topics

    asyncio.run(ensure_topics(settings.bootstrap_servers, [settings.topic_settlements, settings.topic_replay,
                                                          settings.topic_alerts, settings.topic_dlq],
                              settings.topic_partitions))
    w = WorkerProcess(settings, index=0, log_dir=Path(settings.data_dir))
    deadline = time.monotonic() + 90
    import urllib.request

    while time.monotonic() < deadline:
        assert w.alive(), "worker exited:\n" + w.log_tail()
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{w.web_port}/healthz", timeout=1).read()
            break
        except OSError:
            time.sleep(0.3)
    else:
        pytest.fail("worker web server never came up:\n" + w.log_tail())
    yield w
    w.stop()


@pytest.fixture
def cli_env(settings) -> dict[str, str]:
    from claimwatch.runtime import settings_env

    return settings_env(settings)
