"""Settings, from the environment (``CLAIMWATCH_*``) or a ``.env`` file outside the repo.

No secret has a default here: an unset broker or Redis URL means "start the
embedded services on loopback".
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RULES = REPO_ROOT / "configs" / "rules.yaml"


class Settings(BaseSettings):
    """Every setting of claimwatch; the environment variable is ``CLAIMWATCH_`` + the upper-case name."""

    model_config = SettingsConfigDict(env_prefix="CLAIMWATCH_", env_file=None, extra="ignore")

    kafka_url: str | None = Field(None, description="e.g. kafka://kafka:9092; unset = embedded Tansu broker")
    redis_url: str | None = Field(None, description="e.g. redis://:password@redis:6379/0; unset = embedded Redis")
    redis_aux_url: str | None = Field(
        None, description="a second Redis for the rules in redis_aux_rules (a second Redis process works on a second "
                          "core); unset = those rules use redis_url, or with an embedded Redis a second embedded one")
    redis_aux_rules: str = Field(
        "prescriber_volume,trace_code_reuse,card_ring",
        description="comma-separated rules whose state lives on the aux Redis (rules whose state is not per card: "
                    "its windows are one Redis process's work less); empty = every rule on redis_url")
    store_url: str | None = Field(None, description="sqlite:///path/alerts.db or postgresql://…; unset = SQLite in data_dir")
    data_dir: Path = Field(Path(".claimwatch"), description="where the default alert store and worker state live")
    rules_path: Path = Field(DEFAULT_RULES, description="rule configuration (YAML)")
    exemptions_path: Path = Field(REPO_ROOT / "configs" / "exemptions.yaml",
                                  description="exemptions registry file (YAML); Redis entries join it")

    topic_settlements: str = "settlements"
    topic_replay: str = "settlements-replay"
    topic_alerts: str = "alerts"
    topic_dlq: str = "settlements-dlq"
    topic_verdicts: str = "verdicts"
    topic_partitions: int = Field(4, ge=1, le=1024)

    app_id: str = "claimwatch"
    ingest: str = Field("direct", pattern="^(direct|faust)$",
                        description="direct: batched aiokafka consumer inside the Faust app (fast); "
                                    "faust: a Faust agent with take_events (about 10k events/s ceiling)")
    batch_max: int = Field(5000, ge=1, le=100_000, description="max events per processed batch")
    batch_within_s: float = Field(0.1, gt=0, le=10)
    consumer_max_fetch_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    rebalance_timeout_s: float = Field(6.0, gt=0)
    session_timeout_s: float = Field(20.0, gt=0)
    worker_web_port: int = Field(0, ge=0, le=65535, description="0 = pick a free loopback port")
    web_bind: str = Field("127.0.0.1", description="address the worker's web server (/healthz, /metrics) binds")
    max_event_bytes: int = Field(256 * 1024, ge=1024, description="larger messages go to the dead-letter topic")
    future_tolerance_s: int = Field(86_400, ge=0, description="event_time further in the future than this is invalid")
    lang: str = Field("zh", pattern="^(zh|en)$")

    @field_validator("kafka_url", "redis_url", "redis_aux_url", "store_url", mode="before")
    @classmethod
    def _blank_is_unset(cls, v):
        return None if isinstance(v, str) and not v.strip() else v

    @field_validator("redis_aux_rules")
    @classmethod
    def _known_rules(cls, v: str) -> str:
        from detectors import REGISTRY

        names = [x.strip() for x in v.split(",") if x.strip()]
        unknown = [x for x in names if x not in REGISTRY]
        if unknown:
            raise ValueError(f"unknown rule(s) {unknown} in CLAIMWATCH_REDIS_AUX_RULES; rules: {sorted(REGISTRY)}")
        return ",".join(names)

    @property
    def aux_rules(self) -> frozenset[str]:
        """The rules whose state is on the aux Redis (none when no aux Redis is configured)."""
        if not self.redis_aux_url or self.redis_aux_url == self.redis_url:
            return frozenset()
        return frozenset(x for x in self.redis_aux_rules.split(",") if x)

    @property
    def redis_urls(self) -> list[str]:
        """Every Redis holding run state: the main one, then the aux one when configured (and different)."""
        urls = [self.redis_url] if self.redis_url else []
        if self.aux_rules:   # (none when the aux URL is unset or the main one)
            urls.append(self.redis_aux_url)
        return urls

    @property
    def store_url_resolved(self) -> str:
        return self.store_url or f"sqlite:///{(self.data_dir / 'alerts.db').resolve()}"

    @property
    def bootstrap_servers(self) -> str:
        """The broker URL in the host:port form aiokafka wants."""
        if not self.kafka_url:
            raise RuntimeError("no broker configured (CLAIMWATCH_KAFKA_URL) and no embedded broker started")
        return ",".join(u.split("://", 1)[-1] for u in self.kafka_url.split(","))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
