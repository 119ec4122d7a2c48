"""Detectors: one module per rule, all behind :class:`detectors.base.Detector`.

Every module in this package that defines a ``Detector`` subclass with a ``rule`` id is
registered automatically; ``configs/rules.yaml`` names rules by these ids.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from detectors.base import Detector, Namespace

_SKIP = {"base", "config", "drugs"}


def _discover() -> dict[str, type[Detector]]:
    found: dict[str, type[Detector]] = {}
    for mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        if mod in _SKIP or mod.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{mod}")
        for obj in vars(module).values():
            if (inspect.isclass(obj) and issubclass(obj, Detector) and not inspect.isabstract(obj)
                    and obj.__module__ == module.__name__ and getattr(obj, "rule", None)):
                if obj.rule in found and found[obj.rule] is not obj:
                    raise RuntimeError(f"rule id {obj.rule!r} defined twice: {found[obj.rule]} and {obj}")
                found[obj.rule] = obj
    return found


#: rule id -> detector class
REGISTRY: dict[str, type[Detector]] = _discover()

__all__ = ["Detector", "Namespace", "REGISTRY"]
