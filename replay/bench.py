"""Benchmarks: commands that print numbers (never timed tests).

* ``quality`` — replays a generated city through the real pipeline (broker, worker processes,
  Redis, store) and scores the alerts against the generator's labels.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from alerts.model import to_dict
from claimwatch.settings import Settings


def machine() -> dict[str, Any]:
    import os

    return {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "date": datetime.now(timezone.utc).date().isoformat()}


def quality(settings: Settings, *, cards: int, days: int, seed: int, workers: int = 1, progress=None,
            ml: bool = True) -> dict[str, Any]:
    from replay import city
    from replay.quality import evaluate
    from replay.runner import replay_file

    with tempfile.TemporaryDirectory(prefix="cw-quality-") as d:
        path = Path(d) / "city.jsonl.gz"
        t0 = time.perf_counter()
        events, labels = city.generate(cards=cards, days=days, seed=seed)
        city.write(events, None, path)
        gen_s = time.perf_counter() - t0
        del events
        run_id = f"quality-{seed}-{int(time.time())}"
        stats, alerts = replay_file(settings, path, run_id, workers=workers, progress=progress)
    report = evaluate([to_dict(a) for a in alerts], labels)
    report.update({"cards": cards, "days": days, "seed": seed, "events": labels["n_events"],
                   "generate_s": round(gen_s, 2), "replay_s": round(stats.seconds, 2), "machine": machine()})
    if ml:
        try:
            from replay.ml_eval import evaluate_ml
        except ImportError:
            pass
        else:
            from claimwatch import runtime

            with runtime.services(settings.model_copy(update={"kafka_url": "unused"})) as s2:
                report["ml"] = evaluate_ml(cards=cards, days=days, seed=seed, redis_url=s2.redis_url)
    return report


def dump(report: dict, path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1, ensure_ascii=False))
