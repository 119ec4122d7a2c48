"""Drug lists the rules weigh: resale-prone drugs (high-value chronic drugs dealers buy to resell).

Matched by code prefix (national insurance drug codes, 国家医保药品编码, are ``X`` + the ATC
class, e.g. ``XB01AC`` platelet inhibitors such as clopidogrel) or by a generic-name keyword,
so a city whose sources use another coding scheme is still covered by the names.

>>> dl = DrugList(code_prefixes=["XB01AC"], name_keywords=["胰岛素"])
>>> dl.matches("XB01ACA002", None), dl.matches("Y123", "甘精胰岛素注射液"), dl.matches("XA10BAA001", "二甲双胍")
(True, True, False)
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable, Sequence


class DrugList:
    def __init__(self, code_prefixes: Sequence[str] = (), name_keywords: Sequence[str] = ()) -> None:
        for field, vals in (("code_prefixes", code_prefixes), ("name_keywords", name_keywords)):
            if isinstance(vals, str) or not all(isinstance(v, str) and v for v in vals):
                raise ValueError(f"resale_prone_drugs.{field} must be a list of non-empty strings, got {vals!r}")
        self.code_prefixes = tuple(sorted(set(code_prefixes)))
        self.name_keywords = tuple(sorted(set(name_keywords)))
        self._cache: dict[tuple[str, str | None], bool] = {}

    def matches(self, code: str, name: str | None = None) -> bool:
        k = (code, name)
        hit = self._cache.get(k)
        if hit is None:
            hit = code.upper().startswith(self.code_prefixes) if self.code_prefixes else False
            if not hit and name and self.name_keywords:
                hit = any(w in name for w in self.name_keywords)
            if len(self._cache) < 100_000:
                self._cache[k] = hit
        return hit

    def as_config(self) -> dict:
        return {"code_prefixes": list(self.code_prefixes), "name_keywords": list(self.name_keywords)}

    def __repr__(self) -> str:
        return f"DrugList({len(self.code_prefixes)} code prefixes, {len(self.name_keywords)} name keywords)"


EMPTY = DrugList()

_PLACEHOLDER = re.compile(r"^\s*(未知|不详|无|空|待定|其他|unknown|unk|null|none|nil|n/?a|na|test|[0０]+|9{4,}|-+|x+|\?+)\s*$",
                          re.IGNORECASE)


_LONG_PLACEHOLDER_START = frozenset("0０9xX?-")


def is_placeholder(value: str | None) -> bool:
    """True for ids a source fills in when it has none: "未知", "0000", "N/A", "" … (data quality, not fraud).

    >>> [is_placeholder(x) for x in ("未知", "0000", "", None, "D310104001007", "UNKNOWN", "99999")]
    [True, True, True, True, False, True, True]
    """
    if value is None:
        return True
    if len(value) > 7:
        c = value[0]
        if c not in _LONG_PLACEHOLDER_START and not c.isspace():
            return False  # fastest path: a long placeholder is one repeated 0/9/x/?/- (spaces around)
    v = value.strip()
    if not v:
        return True
    if len(v) > 7:
        u = v.lower().replace("０", "0")
        if u.count(u[0]) != len(u):
            return False  # fast path: every longer placeholder is one repeated character ("0000…", "9999…", "----")
    return bool(_PLACEHOLDER.match(value))


def ingredient_key(code: str, prefix_len: int) -> str:
    """Active-ingredient key of a drug code: its first ``prefix_len`` characters (whole code if shorter)."""
    return code[:prefix_len] if prefix_len > 0 else code


def iter_drug_lines(items: Iterable) -> Iterable:
    for it in items:
        if it.category == "drug":
            yield it


_SEPARATORS = re.compile("[\t\x1f]")  # separators of the detectors' Lua state: never inside an id


@lru_cache(maxsize=65536)
def placeholder_institution(inst: str) -> bool:
    return is_placeholder(inst)


def unusable_ids(card: str, event_id: str) -> bool:
    """A card id never to blame (placeholder) or an id the Lua state cannot hold.

    >>> unusable_ids("3101198701011234", "E1"), unusable_ids("0000", "E1"), unusable_ids("C" + chr(9) + "1", "E1")
    (False, True, True)
    """
    if "\t" in card or "\x1f" in card or "\t" in event_id or "\x1f" in event_id:
        return True
    if card.isdigit() and card.count(card[0]) != len(card):  # fast path: a real card number
        return False
    return is_placeholder(card)


def clean_text(s: str) -> str:
    """Text safe to embed in the Lua state (separators replaced by spaces)."""
    return _SEPARATORS.sub(" ", s) if "\t" in s or "\x1f" in s else s
