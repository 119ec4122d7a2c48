"""Rules reload without a restart; a bad file is refused and the running rules stay in force."""

from __future__ import annotations

import shutil
import time
import urllib.request

from claimwatch.runtime import WorkerProcess
from claimwatch.settings import DEFAULT_RULES
from detectors.config import load_rules
from tests.reliability.conftest import isolated, wait_ready  # noqa: F401  (fixture)


def _metrics(w) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{w.web_port}/metrics", timeout=5).read().decode()


def _wait_for(pred, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.5)
    return False


def test_hot_reload_and_refusal(isolated, tmp_path):  # noqa: F811
    rules = tmp_path / "rules.yaml"
    shutil.copy(DEFAULT_RULES, rules)
    s = isolated.model_copy(update={"rules_path": rules})
    v1 = load_rules(rules).version
    w = WorkerProcess(s, index=7, log_dir=tmp_path)
    try:
        wait_ready(w)
        assert f'claimwatch_rules_info{{version="{v1}"}} 1.0' in _metrics(w)

        good = rules.read_text()
        rules.write_text(good.replace("min_institutions: 12", "min_institutions: -3"))
        assert _wait_for(lambda: "claimwatch_rules_reload_errors_total 1.0" in _metrics(w)), w.log_tail()
        assert f'claimwatch_rules_info{{version="{v1}"}} 1.0' in _metrics(w)  # old rules still in force
        assert "windows[0].min_institutions must be a positive integer, got -3" in w.log_tail(100_000)
        assert w.alive()

        rules.write_text(good.replace("min_institutions: 12", "min_institutions: 11"))
        v2 = load_rules(rules).version
        assert v2 != v1
        assert _wait_for(lambda: f'claimwatch_rules_info{{version="{v2}"}} 1.0' in _metrics(w)), w.log_tail()
    finally:
        w.stop()
