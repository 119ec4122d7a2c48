"""Prometheus metrics of claimwatch (prefix ``claimwatch_``, base units, ``_total`` counters,
no card / person ids in labels). Every worker serves its own registry on ``/metrics`` of its
own web port; other services expose theirs through :func:`render`.
"""

from __future__ import annotations

import re

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)
_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)

settlements_consumed = Counter("claimwatch_settlements_consumed_total", "Messages consumed from settlement topics",
                               ["topic"], registry=REGISTRY)
settlements_processed = Counter("claimwatch_settlements_processed_total", "Valid settlements run through the detectors",
                                ["stream"], registry=REGISTRY)
settlements_invalid = Counter("claimwatch_settlements_invalid_total",
                              "Invalid messages sent to the dead-letter topic, by reason", ["reason"], registry=REGISTRY)
late_events = Counter("claimwatch_late_events_total", "Settlements later than the allowed lateness", ["stream"],
                      registry=REGISTRY)
alerts_emitted = Counter("claimwatch_alerts_total", "Alert upserts published, by rule and severity",
                         ["rule", "severity"], registry=REGISTRY)
alerts_suppressed = Counter("claimwatch_alerts_suppressed_total", "Alerts silenced by an exemption (stored, not published)",
                            ["rule"], registry=REGISTRY)
data_quality = Counter("claimwatch_data_quality_findings_total", "Placeholder or unknown ids seen, by field",
                       ["field"], registry=REGISTRY)
event_to_alert = Histogram("claimwatch_event_to_alert_latency_seconds",
                           "Event time of the firing settlement to alert publication (live stream)",
                           buckets=_LAT, registry=REGISTRY)
processing_latency = Histogram("claimwatch_processing_latency_seconds",
                               "Broker append time to end of processing, wall clock", buckets=_LAT, registry=REGISTRY)
batch_size = Histogram("claimwatch_batch_size", "Messages per processed batch",
                       buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000), registry=REGISTRY)
batch_duration = Histogram("claimwatch_batch_duration_seconds", "Time to process one batch end to end",
                           buckets=_LAT, registry=REGISTRY)
redis_latency = Histogram("claimwatch_redis_latency_seconds", "Detector round trip to Redis per batch",
                          buckets=_LAT, registry=REGISTRY)
redis_errors = Counter("claimwatch_redis_errors_total", "Redis or broker errors that made a batch retry",
                       registry=REGISTRY)
consumer_lag = Gauge("claimwatch_consumergroup_lag", "Messages behind the high watermark, per topic partition",
                     ["topic", "partition"], registry=REGISTRY)
partitions_assigned = Gauge("claimwatch_partitions_assigned", "Partitions assigned to this worker", registry=REGISTRY)
rules_version = Gauge("claimwatch_rules_info", "Rule configuration in force (value 1)", ["version"], registry=REGISTRY)
rules_reload_errors = Counter("claimwatch_rules_reload_errors_total", "Refused rule configuration reloads",
                              registry=REGISTRY)
replay_processed = Counter("claimwatch_replay_events_processed_total", "Replay settlements processed, by run",
                           ["run"], registry=REGISTRY)
model_score = Histogram("claimwatch_model_score", "Online-model outlier scores",
                        buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0), registry=REGISTRY)
model_threshold = Gauge("claimwatch_model_alert_threshold", "Running score quantile above which ml_outlier fires",
                        registry=REGISTRY)
verdicts = Counter("claimwatch_verdicts_total",
                   "Verdicts consumed, by outcome (learned, duplicate, unknown_alert, invalid, error)",
                   ["outcome"], registry=REGISTRY)

_REASONS = [
    ("oversize", re.compile(r"exceeds max_event_bytes")),
    ("invalid_json", re.compile(r"not valid JSON|malformed|invalid character|UTF-8|truncated", re.I)),
    ("not_object", re.compile(r"Expected `object`")),
    ("missing_field", re.compile(r"missing required field")),
    ("event_time", re.compile(r"event_time|admitted_at|discharged_at")),
    ("out_of_range", re.compile(r">=|<=|> |< |length")),
    ("wrong_type", re.compile(r"Expected `")),
    ("bad_enum", re.compile(r"Invalid enum")),
    ("inconsistent", re.compile(r"exceeds total_amount")),
    ("empty", re.compile(r"empty message")),
]


def reason_kind(reason: str) -> str:
    """Low-cardinality label for an invalid-input reason.

    >>> reason_kind("Expected `str`, got `int` - at `$.card_id`"), reason_kind("not valid JSON: x")
    ('wrong_type', 'invalid_json')
    """
    for name, rx in _REASONS:
        if rx.search(reason):
            return name
    return "other"


def render() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
