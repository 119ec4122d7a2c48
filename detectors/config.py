"""Load ``configs/rules.yaml`` into detectors, refusing bad configuration with a clear message.

>>> rs = load_rules_text("lateness_s: 60\\nrules:\\n  card_hopping:\\n    windows: [{window_s: 86400, min_institutions: 12}]\\n")
>>> [d.rule for d in rs.detectors], rs.lateness_s
(['card_hopping'], 60)
>>> load_rules_text("rules:\\n  card_hopping:\\n    windows: [{window_s: -1, min_institutions: 12}]\\n", source="x.yaml")
Traceback (most recent call last):
...
detectors.config.ConfigError: x.yaml: rules.card_hopping: card_hopping: windows[0].window_s must be a positive integer, got -1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import inspect

import yaml

from detectors import REGISTRY
from detectors.base import Detector, config_version
from detectors.drugs import DrugList


class ConfigError(ValueError):
    """A rule configuration that cannot be used; the message says what and where."""


@dataclass
class RuleSet:
    detectors: list[Detector]
    lateness_s: int
    version: str
    versions: dict[str, str] = field(default_factory=dict)
    source: str = ""


def load_rules_text(text: str, *, source: str = "<rules>", lang: str = "zh") -> RuleSet:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: top level must be a mapping with 'rules', got {type(doc).__name__}")
    unknown = set(doc) - {"lateness_s", "rules", "version", "resale_prone_drugs"}
    if unknown:
        raise ConfigError(f"{source}: unknown top-level field(s) {sorted(unknown)}")
    lateness = doc.get("lateness_s", 3600)
    if isinstance(lateness, bool) or not isinstance(lateness, int) or lateness < 0:
        raise ConfigError(f"{source}: lateness_s must be a non-negative integer, got {lateness!r}")
    rp = doc.get("resale_prone_drugs") or {}
    if not isinstance(rp, dict) or set(rp) - {"code_prefixes", "name_keywords"}:
        raise ConfigError(f"{source}: resale_prone_drugs must be a mapping with code_prefixes and name_keywords")
    try:
        resale = DrugList(rp.get("code_prefixes") or (), rp.get("name_keywords") or ())
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    rules = doc.get("rules")
    if not isinstance(rules, dict) or not rules:
        raise ConfigError(f"{source}: 'rules' must be a non-empty mapping of rule id to settings")
    detectors: list[Detector] = []
    versions: dict[str, str] = {}
    for rule, cfg in rules.items():
        where = f"{source}: rules.{rule}"
        if rule not in REGISTRY:
            raise ConfigError(f"{where}: unknown rule; known rules: {', '.join(sorted(REGISTRY))}")
        if cfg is None:
            cfg = {}
        if not isinstance(cfg, dict):
            raise ConfigError(f"{where}: must be a mapping, got {type(cfg).__name__}")
        params: dict[str, Any] = dict(cfg)
        enabled = params.pop("enabled", True)
        if not isinstance(enabled, bool):
            raise ConfigError(f"{where}.enabled must be true or false, got {enabled!r}")
        cls = REGISTRY[rule]
        takes_drugs = "resale_prone" in inspect.signature(cls.__init__).parameters
        version = config_version({"rule": rule, "lateness_s": lateness, **cfg,
                                  **({"resale_prone_drugs": resale.as_config()} if takes_drugs else {})})
        versions[rule] = version
        if not enabled:
            continue
        if takes_drugs:
            params["resale_prone"] = resale
        try:
            detectors.append(cls(**params, lateness_s=lateness, lang=lang, version=version))
        except TypeError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return RuleSet(detectors, lateness, config_version(versions), versions, source)


def load_rules(path: Path | str, *, lang: str = "zh") -> RuleSet:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read rule configuration: {exc.strerror}") from None
    return load_rules_text(text, source=str(p), lang=lang)
