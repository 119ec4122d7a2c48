"""Structured JSON logs: one object per line, with the worker's process run id, never personal data.

Log messages name topics, partitions, offsets, rule ids and reasons; never card, person or
physician ids (those belong in alerts, which are access-controlled, not in logs).

>>> import logging
>>> rec = logging.LogRecord("claimwatch.worker", logging.WARNING, __file__, 1, "batch failed (%s)", ("x",), None)
>>> sorted(orjson.loads(JsonFormatter().format(rec)))
['level', 'logger', 'msg', 'pid', 'process_run_id', 'ts']
"""

from __future__ import annotations

import logging
import os
import uuid
from datetime import datetime, timezone

import orjson

PROCESS_RUN_ID = uuid.uuid4().hex[:12]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage(),
               "pid": os.getpid(), "process_run_id": PROCESS_RUN_ID}
        run = getattr(record, "run_id", None)
        if run:
            doc["run_id"] = run
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


def logging_config(level: str = "WARNING") -> dict:
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"json": {"()": "stream.logs.JsonFormatter"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "root": {"level": level.upper(), "handlers": ["stderr"]},
    }
