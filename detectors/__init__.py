"""Detectors: one module per rule, all behind :class:`detectors.base.Detector`."""

from detectors.base import Detector, Namespace
from detectors.card_hopping import CardHopping

#: rule id -> detector class; ``configs/rules.yaml`` names rules by these ids.
REGISTRY: dict[str, type[Detector]] = {
    CardHopping.rule: CardHopping,
}

__all__ = ["Detector", "Namespace", "REGISTRY", "CardHopping"]
