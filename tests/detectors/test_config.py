"""Rule configuration: the shipped file loads; bad files are refused with what and where."""

from __future__ import annotations

import pytest

from claimwatch.settings import DEFAULT_RULES
from detectors.config import ConfigError, load_rules, load_rules_text


def test_shipped_rules_load_with_versions():
    rs = load_rules(DEFAULT_RULES)
    assert "card_hopping" in [d.rule for d in rs.detectors]
    assert all(len(v) == 12 for v in rs.versions.values())


def test_version_changes_with_any_threshold():
    a = load_rules_text("rules:\n  card_hopping:\n    windows: [{window_s: 86400, min_institutions: 12}]\n")
    b = load_rules_text("rules:\n  card_hopping:\n    windows: [{window_s: 86400, min_institutions: 13}]\n")
    assert a.versions["card_hopping"] != b.versions["card_hopping"]
    assert a.version != b.version


@pytest.mark.parametrize("text, message", [
    ("rules: [1, 2", "x.yaml: not valid YAML"),
    ("- 1\n", "x.yaml: top level must be a mapping with 'rules', got list"),
    ("rules: {}\n", "x.yaml: 'rules' must be a non-empty mapping of rule id to settings"),
    ("rules:\n  card_hoping: {}\n", "x.yaml: rules.card_hoping: unknown rule; known rules: "),
    ("lateness_s: -1\nrules:\n  card_hopping: {}\n", "x.yaml: lateness_s must be a non-negative integer, got -1"),
    ("rules:\n  card_hopping:\n    enabled: maybe\n", "x.yaml: rules.card_hopping.enabled must be true or false, got 'maybe'"),
    ("rules:\n  card_hopping:\n    windows: [{window_s: 86400, min_institutions: zwölf}]\n",
     "x.yaml: rules.card_hopping: card_hopping: windows[0].min_institutions must be a positive integer, got 'zwölf'"),
    ("bogus: 1\nrules:\n  card_hopping: {}\n", "x.yaml: unknown top-level field(s) ['bogus']"),
])
def test_bad_configuration_is_refused_with_what_and_where(text, message):
    with pytest.raises(ConfigError) as exc:
        load_rules_text(text, source="x.yaml")
    assert str(exc.value).startswith(message)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: cannot read rule configuration"):
        load_rules(tmp_path / "nope.yaml")
