"""``ml_outlier``: an online, unsupervised model flags settlements unlike anything the stream has shown.

Rules catch the patterns we know; this catches the ones we don't. Per settlement, the
features of :mod:`detectors._features` (card velocity, days supply, resale-prone share,
amount, physician and institution volume …) are **scored before the model learns from
them**; a running quantile of the scores (river :class:`~river.anomaly.QuantileFilter`,
P² estimator) is the threshold, so about ``target_alert_rate`` of the settlements
(default 1 per 1,000) are flagged. A flagged settlement is not learned from (the
filter protects the model). The alert names the features that drove the score.

The model. :class:`TailHBOS` is a river :class:`~river.base.AnomalyDetector`: an online
histogram-based outlier score (HBOS, Goldstein & Dengel 2012) over the *upper tail* of
each feature — how rarely has a value this high been seen — on log-spaced bins, averaged
over the features and normalised by ``log(n + 2)``: a score in [0, 1] whose scale does
not drift as the model sees more data. On the generated city (20,000 cards, 7 days,
seeds 1-3, per-event labels) it measured ROC AUC 0.90-0.91, against 0.79-0.86 for
``MinMaxScaler | HalfSpaceTrees`` (default or 10 trees × height 8, window 100) on the same
features, at about a fifth of the cost (≈ 8 µs against ≈ 45 µs per score + learn), and
it explains itself: each feature's term is its share of the score. The direction-free
features (``hour``, ``fund_share``, ``n_lines``) are computed and kept in the alert's
metrics (the priority model uses them), but not scored by default: as two-sided rarities
they lowered ROC AUC by 0.015-0.02.

Determinism. One model per (run, input partition); within a partition the order of
events is fixed, the feature windows do not depend on other partitions (see
:mod:`detectors._features`) and nothing is random, so the same replay gives the same
scores and the same alerts however the partitions interleave in the fetched batches.

State. The feature windows (see :mod:`detectors._features`) are a card's recent settlements,
one field (``ml_outlier``) of the per-card hash ``cw:{run}:c:{card}`` (``card_hash = "c"``,
needed 7 d + lateness after the card's last settlement: ``card_ttl_s``), and per-partition
physician and institution volumes (``cw:{run}:ml_outlier:p{partition}:…``). Each model is
checkpointed (its plain state and river's quantile, pickled; only plain containers and river
classes are accepted on load) to ``cw:{run}:ml_outlier:model:p{partition}`` every
``checkpoint_every`` settlements of its partition, written with the next batch's Redis round
trip, and restored on first use. A worker adopts a newer checkpoint written by another worker
after a rebalance; a detector built by a rules reload takes over its predecessor's models
(:meth:`MlOutlier.adopt_state`). A run without checkpoints of its own starts from the named
``snapshot`` (saved with :func:`save_snapshot`) when configured, else fresh. Only the first
delivery of an event is learned from (the feature script reports redeliveries), so a
redelivered batch never trains twice; after a crash, what the model learned since its last
checkpoint is lost (at most ``checkpoint_every`` settlements plus one batch).

Cost. Per batch, the features are binned straight from the feature script's reply
(:class:`FeatureBins`: no per-settlement feature dict; it is built only for a flagged
settlement or a ``score_sink``) and each partition's model scores and learns its settlements
in one loop (:meth:`PartitionModel.run`), with the same arithmetic in the same order as
:meth:`TailHBOS.score_bins` / :meth:`TailHBOS.learn_bins` one at a time, so the scores are
bit-for-bit those of the one-at-a-time model: about 10 µs of worker CPU per settlement in all,
of which learning is about 1.5 µs. ``learn_every = k > 1`` learns from about one settlement in
k, chosen by a CRC-32 of its event id (the same ones on every replay, redelivery or restore);
on the generated city k = 2 cost 0.0005-0.004 of ROC AUC, k = 4 up to 0.006 (and 0.015 of PR AUC).

>>> MlOutlier(target_alert_rate=0.001, checkpoint_every=5000).params()["warmup_events"]
1000
>>> MlOutlier(target_alert_rate=0.7)
Traceback (most recent call last):
...
ValueError: ml_outlier: target_alert_rate must be a number in (0, 0.5), got 0.7
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import pickle
import time
import zlib
from operator import itemgetter
from typing import Any, Callable, Iterable, Sequence

from river import anomaly, base

from alerts.model import Alert, alert_id, now_iso, severity_for
from detectors import _features as F
from detectors.base import Detector, Namespace, check_positive
from detectors.drugs import EMPTY, DrugList
from stream.events import Settlement, iso

log = logging.getLogger("claimwatch.ml_outlier")

try:  # the worker's Prometheus metrics (score histogram, threshold gauge), when present
    from stream import metrics as _M

    if not hasattr(_M, "model_score") or not hasattr(_M, "model_threshold"):
        _M = None  # type: ignore[assignment]
except ImportError:  # pragma: no cover
    _M = None  # type: ignore[assignment]

#: features with a direction (more is more suspicious): the ones the model scores by default
DEFAULT_MODEL_FEATURES: tuple[str, ...] = tuple(f for f in F.FEATURES if f not in ("hour", "fund_share", "n_lines"))
CHECKPOINT_MAGIC = b"cw-ml1"
_PERCENT = {"resale_share", "fund_share"}


class TailHBOS(base.AnomalyDetector):
    """Online upper-tail histogram outlier score (see the module docstring); high = anomalous.

    Values are binned on ``floor(log1p(v) * bins_per_unit)`` (negative values fall in bin 0).
    For each feature, the term is ``log((n + 1) / (m + 1)) / log(n + 2)`` where ``m`` is how
    many of the ``n`` learned values fell in this value's bin or above: 0 for a value at
    the bottom, close to 1 for one never seen this high. The score is the mean of the terms
    (0-1), so it does not drift as the model sees more data. Every ``forget_every`` learned
    events all counts are halved, so the model follows drift with a half-life of that many
    events.

    >>> m = TailHBOS()
    >>> for k in range(100):
    ...     m.learn_one({"a": k % 3, "b": 1.0})
    >>> m.score_one({"a": 1, "b": 1.0}) < 0.2 < 0.9 < m.score_one({"a": 50, "b": 9.0})
    True
    >>> {k: round(v, 2) for k, v in m.contributions({"a": 50, "b": 1.0}).items()}
    {'a': 1.0, 'b': 0.0}
    """

    MAX_BINS = 64

    def __init__(self, bins_per_unit: float = 3.0, forget_every: int = 200_000):
        self.bins_per_unit = bins_per_unit
        self.forget_every = forget_every
        self._counts: dict[str, list[float]] = {}
        self._lo: dict[str, int] = {}   # lowest bin seen per feature: at or below it the term is 0
        self._n = 0.0
        self._learned = 0

    def bin_of(self, v: float) -> int:
        """The bin of one value: ``floor(log1p(v) * bins_per_unit)``, at most ``MAX_BINS - 1``; 0 for
        ``v <= 0`` (and NaN)."""
        if v > 0:
            b = int(math.log1p(v) * self.bins_per_unit)
            return b if b < self.MAX_BINS - 1 else self.MAX_BINS - 1
        return 0

    def bins(self, x: dict, names: Iterable[str] | None = None) -> list[tuple[str, int]]:
        """``(feature, bin)`` pairs of ``x`` (of its ``names`` only, when given): compute once, then
        :meth:`score_bins` / :meth:`learn_bins`."""
        bpu = self.bins_per_unit
        top = self.MAX_BINS - 1
        log1p = math.log1p
        out = []
        for k in (x if names is None else names):
            v = x[k]
            if v > 0:  # also rules out NaN
                b = int(log1p(v) * bpu)
                out.append((k, b if b < top else top))
            else:
                out.append((k, 0))
        return out

    def learn_bins(self, bins: list[tuple[str, int]]) -> None:
        counts = self._counts
        lo = self._lo
        for k, b in bins:
            c = counts.get(k)
            if c is None:
                c = counts[k] = []
                lo[k] = b
            elif b < lo[k]:
                lo[k] = b
            if b >= len(c):
                c.extend([0.0] * (b + 1 - len(c)))
            c[b] += 1.0
        self._n += 1.0
        self._learned += 1
        if self._learned % self.forget_every == 0:
            for k, c in counts.items():
                counts[k] = [v / 2 for v in c]
            self._n /= 2

    def terms(self, bins: list[tuple[str, int]]) -> dict[str, float]:
        """Each feature's term of the score (0 = common value … 1 = never seen this high)."""
        ln, norm = math.log(self._n + 1), math.log(self._n + 2)
        out = {}
        for k, b in bins:
            c = self._counts.get(k)
            m = sum(c[b:]) if c else 0.0
            out[k] = round((ln - math.log(m + 1)) / norm, 6)
        return out

    def score_bins(self, bins: list[tuple[str, int]]) -> float:
        if not bins:
            return 0.0
        counts = self._counts
        lo = self._lo
        log = math.log
        ln = log(self._n + 1)
        s = 0.0
        for k, b in bins:
            c = counts.get(k)
            if c is None:
                s += ln
            elif b > lo[k]:  # (at or below the lowest bin seen, every value is this high: term 0)
                s += ln - log(sum(c[b:]) + 1) if b < len(c) else ln
        return s / (log(self._n + 2) * len(bins))

    # -- river's AnomalyDetector contract --------------------------------------------------
    def learn_one(self, x: dict) -> None:
        self.learn_bins(self.bins(x))

    def score_one(self, x: dict) -> float:
        return self.score_bins(self.bins(x))

    def contributions(self, x: dict) -> dict[str, float]:
        """Each feature's term of the score of ``x``."""
        return self.terms(self.bins(x))


class _Table(dict):
    """key -> bin, filled on first sight (bounded: past the bound, computed every time)."""

    def __init__(self, bin_of: Callable[[float], int]) -> None:
        super().__init__()
        self.bin_of = bin_of

    def __missing__(self, key: Any) -> int:
        b = self.bin_of(float(key))
        if len(self) < 100_000:
            self[key] = b
        return b


class FeatureBins:
    """The bins of the model's features for a whole batch, straight from the feature script's reply
    tokens and the events (no per-event feature dict): the same bins as
    ``TailHBOS.bins(features(ev, window, resale), names)``, at a fraction of the cost — counts are
    binned by a table keyed by their reply token, amounts and (rounded) ratios by tables keyed by value,
    and features the model does not use are not computed.

    >>> from stream.events import parse_event
    >>> ev = parse_event(b'{"event_id":"E1","event_time":"2026-11-24T09:30:00+08:00","card_id":"C1",'
    ...     b'"institution_id":"P1","institution_type":"pharmacy","district":"310101","visit_type":"pharmacy",'
    ...     b'"items":[],"total_amount":192.0,"fund_paid":115.2}')
    >>> reply = b"1 3 9 9 3 9 9 2 4 4 84.0000 -1 0.000000 0 6 2.000000 3"
    >>> fb, m = FeatureBins(TailHBOS(), ["amount_cny", "card_inst_24h", "inst_vol_ratio"]), TailHBOS()
    >>> x = F.features(ev, F.Window.from_reply(reply))
    >>> fb([ev], reply.split(), [(0, 0.0)]) == [tuple(b for _, b in m.bins(x, fb.names))]
    True
    """

    def __init__(self, hbos: TailHBOS, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self.bin_of = hbos.bin_of
        order = list(F.FEATURES)
        if order[5:14] != [k for k in F.FEATURES if k in F.COUNT_TOKENS]:  # the row built in __call__
            raise RuntimeError("FeatureBins: the order of detectors._features.FEATURES changed")
        # the row built in __call__ holds the features in FEATURES order, except the nine card counts,
        # which are in reply-token order (binned in one pass over their tokens): token k at 4 + k
        idx = [4 + F.COUNT_TOKENS[k] if k in F.COUNT_TOKENS else order.index(k) for k in self.names]
        if len(idx) > 1:
            self._pick: Callable[[list[int]], tuple[int, ...]] = itemgetter(*idx)
        else:
            self._pick = lambda row, i=idx[0]: (row[i],)
        self._hour, self._fund, self._lines = (k in self.names for k in ("hour", "fund_share", "n_lines"))
        self._tokens = _Table(self.bin_of)
        self._amounts = _Table(self.bin_of)
        self._values = _Table(self.bin_of)     # ratios and shares, rounded: few distinct values
        self._one = self.bin_of(1.0)

    def __call__(self, events: Sequence[Settlement], tok: Sequence[bytes],
                 extras: Sequence[tuple[int, float]]) -> list[tuple[int, ...]]:
        """Bins of ``names`` for every event (``tok``: the batch's reply tokens, ``extras``: each event's
        days supplied and resale-prone amount, from :func:`~detectors._features.queue_windows`)."""
        tb, ab, vb, one, pick = self._tokens, self._amounts, self._values, self._one, self._pick
        counts = tb.__getitem__
        hour, fund, lines = self._hour, self._fund, self._lines
        horizon = F.SUPPLY_HORIZON_D
        out = []
        o = 0
        for ev, (supply, ramt) in zip(events, extras):
            total = ev.total_amount
            t = tok[o + 10]
            if supply == 0 and t == b"0.0000":
                sb = 0
            else:
                sb = vb[round((float(t) + supply) / horizon, 2)]
            t, d = tok[o + 11], tok[o + 13]
            if t == b"-1" or d == b"0" or int(t) < 0 or int(d) <= 0:
                pb = one
            else:
                pb = vb[round((int(t) + 1) / (float(tok[o + 12]) + 1), 2)]
            t, d = tok[o + 14], tok[o + 16]
            if t == b"-1" or d == b"0" or int(t) < 0 or int(d) <= 0:
                ib = one
            else:
                ib = vb[round((int(t) + 1) / (float(tok[o + 15]) + 1), 2)]
            row = [ab[total],
                   (vb[round(ev.fund_paid / total, 4)] if total > 0 else 0) if fund else 0,
                   tb[len(ev.items)] if lines else 0,
                   0 if ramt == 0 or not total > 0 else vb[round(ramt / total, 4)],
                   vb[round(((ev.ts + F.TZ_OFFSET_S) % F.DAY_S) / 3600, 2)] if hour else 0,
                   *map(counts, tok[o + 1:o + 10]),
                   sb, pb, ib]
            out.append(pick(row))
            o += F.REPLY_WIDTH
        return out


class PartitionModel:
    """The model of one (run, input partition): a :class:`TailHBOS` inside a QuantileFilter, and counters."""

    def __init__(self, q: float, bins_per_unit: float, forget_every: int) -> None:
        self.filter = anomaly.QuantileFilter(TailHBOS(bins_per_unit, forget_every), q=q,
                                             protect_anomaly_detector=True)
        self.seen = 0          # first deliveries scored
        self.learned = 0       # of which learned from
        self.flagged = 0
        self.since_checkpoint = 0

    @property
    def detector(self) -> TailHBOS:
        return self.filter.anomaly_detector

    def run(self, order: Iterable[int], bins: Sequence[Sequence[int]], new: Sequence[bool], names: Sequence[str],
            scores: list[float], *, warmup: int,
            sample: Sequence[bool] | None = None) -> list[tuple[int, float, dict[str, float]]]:
        """Score, then learn from, settlements ``order`` (indexes into the batch's ``bins`` / ``new``, in
        this partition's order) exactly as :meth:`TailHBOS.score_bins` / :meth:`TailHBOS.learn_bins`
        one at a time would, with the histograms in local variables. A first delivery that is not
        flagged is learned from (only those with ``sample[i]``, when given). Each score goes to
        ``scores``; returns ``(index, threshold, terms)`` of the flagged ones."""
        det = self.filter.anomaly_detector
        q = self.filter.quantile
        counts, lo_of = det._counts, det._lo
        cl: list[list[float] | None] = [counts.get(k) for k in names]
        lens = [0 if c is None else len(c) for c in cl]   # len(cl[j]), kept up to date
        lo = [lo_of.get(k, 0) for k in names]
        width = range(len(names))
        n, total, forget = det._n, det._learned, det.forget_every
        log, inf = math.log, math.inf
        ln, norm = log(n + 1), log(n + 2) * len(names)
        seen, learned, flagged, since = self.seen, self.learned, self.flagged, self.since_checkpoint
        hits: list[tuple[int, float, dict[str, float]]] = []
        for i in order:
            b = bins[i]
            s = 0.0
            for c, low, k, nc in zip(cl, lo, b, lens):
                if c is None:
                    s += ln
                elif k > low:  # (at or below the lowest bin seen, every value is this high: term 0)
                    s += ln - log(sum(c[k:]) + 1) if k < nc else ln
            score = s / norm
            scores[i] = score
            thr = q.get()
            if thr is None:
                thr = inf
            hit = seen >= warmup and score >= thr
            if new[i]:
                seen += 1
                if not hit and (sample is None or sample[i]):
                    for j in width:
                        k = b[j]
                        c = cl[j]
                        if c is None:
                            c = cl[j] = counts[names[j]] = []
                            lo[j] = k
                        elif k < lo[j]:
                            lo[j] = k
                        if k >= lens[j]:
                            c.extend([0.0] * (k + 1 - lens[j]))
                            lens[j] = k + 1
                        c[k] += 1.0
                    n += 1.0
                    total += 1
                    learned += 1
                    if total % forget == 0:
                        for c in counts.values():
                            c[:] = [v / 2 for v in c]
                        n /= 2
                    ln, norm = log(n + 1), log(n + 2) * len(names)
                q.update(score)
                since += 1
                flagged += hit
            if hit:
                det._n = n
                hits.append((i, thr, det.terms(list(zip(names, b)))))
        det._n, det._learned = n, total
        for k, c, low in zip(names, cl, lo):
            if c is not None:
                lo_of[k] = low
        self.seen, self.learned, self.flagged, self.since_checkpoint = seen, learned, flagged, since
        return hits

    def threshold(self) -> float:
        q = self.filter.quantile.get()
        return math.inf if q is None else q

    def state(self) -> dict[str, Any]:
        """Plain data (and river's quantile): what a checkpoint holds. No class of this module is
        pickled, so a checkpoint loads whatever imported this module, and the whitelist stays small."""
        d = self.detector
        return {"format": 1, "seen": self.seen, "learned": self.learned, "flagged": self.flagged,
                "hbos": {"bins_per_unit": d.bins_per_unit, "forget_every": d.forget_every,
                         "counts": {k: list(c) for k, c in d._counts.items()}, "n": d._n, "learned": d._learned},
                "quantile": self.filter.quantile}

    @classmethod
    def from_state(cls, st: Any) -> "PartitionModel":
        from river import stats

        try:
            h = st["hbos"]
            if st.get("format") != 1 or not isinstance(st["quantile"], stats.Quantile):
                raise TypeError("not a format-1 checkpoint")
            m = cls(st["quantile"].q, float(h["bins_per_unit"]), int(h["forget_every"]))
            det = m.detector
            det._counts = {str(k): [float(v) for v in c] for k, c in h["counts"].items()}
            det._lo = {k: next((b for b, v in enumerate(c) if v > 0), 0) for k, c in det._counts.items()}
            det._n = float(h["n"])
            det._learned = int(h["learned"])
            m.filter.quantile = st["quantile"]
            m.seen, m.learned, m.flagged = int(st["seen"]), int(st["learned"]), int(st["flagged"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise pickle.UnpicklingError(f"checkpoint is not a model state: {exc}") from None
        return m


_SAFE_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "float", "int", "bool", "str", "bytes",
                  "complex", "bytearray"}


class _Unpickler(pickle.Unpickler):
    """Loads checkpoints only: plain containers and river's classes; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module == "builtins" and name in _SAFE_BUILTINS) or module.startswith("river.") \
                or (module == "collections" and name in ("defaultdict", "OrderedDict", "deque", "Counter")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint refers to {module}.{name}, which a model checkpoint never holds")


def dump_model(m: PartitionModel, config: str) -> bytes:
    """Checkpoint bytes: ``cw-ml1 {config} {seen}\\n`` + pickle of :meth:`PartitionModel.state`
    (the header is read without unpickling)."""
    return b"%s %s %d\n" % (CHECKPOINT_MAGIC, config.encode(), m.seen) + pickle.dumps(m.state(), protocol=5)


def _header(blob: bytes | None) -> tuple[str, int] | None:
    if not blob or not blob.startswith(CHECKPOINT_MAGIC + b" "):
        return None
    head = blob[:blob.find(b"\n")].split(b" ")
    if len(head) != 3:
        return None
    try:
        return head[1].decode(), int(head[2])
    except ValueError:
        return None


def load_model(blob: bytes) -> PartitionModel:
    return PartitionModel.from_state(_Unpickler(io.BytesIO(blob[blob.find(b"\n") + 1:])).load())


def model_key(run_id: str, partition: int) -> str:
    return f"cw:{run_id}:ml_outlier:model:p{partition}"


def snapshot_key(name: str, partition: int) -> str:
    return f"cw:snapshots:ml_outlier:{name}:p{partition}"


async def save_snapshot(redis: Any, run_id: str, name: str) -> int:
    """Copy the run's model checkpoints to the named snapshot (no expiry); return how many partitions."""
    n = 0
    async for key in redis.scan_iter(match=model_key(run_id, 0)[:-1] + "*"):
        k = key.decode() if isinstance(key, bytes) else key
        part = int(k.rsplit(":p", 1)[1])
        blob = await redis.get(k)
        if blob:
            await redis.set(snapshot_key(name, part), blob)
            n += 1
    return n


def _fmt(name: str, v: float) -> str:
    if name in _PERCENT:
        return f"{v * 100:.0f}%"
    if name == "amount_cny":
        return f"¥{v:,.2f}"
    if name == "hour":
        return f"{int(v):02d}:{int(round((v % 1) * 60)) % 60:02d}"
    return f"{v:g}"


class MlOutlier(Detector):
    """Online outlier model over settlement features (see the module docstring)."""

    rule = "ml_outlier"
    subject_type = "card"
    scripts = (F.LUA,)
    card_hash = "c"
    #: models kept in memory (a worker sees every partition of every replay run it serves)
    max_models = 512

    def __init__(self, *, target_alert_rate: float = 0.001, warmup_events: int = 1000, checkpoint_every: int = 5000,
                 checkpoint_ttl_s: int = 30 * 86400, bins_per_unit: float = 3.0, forget_every: int = 200_000,
                 learn_every: int = 1, top_features: int = 3, snapshot: str | None = None,
                 features: Sequence[str] | None = None, resale_prone: DrugList = EMPTY, lateness_s: int = 3600,
                 lang: str = "zh", version: str = "") -> None:
        super().__init__(lateness_s=lateness_s, lang=lang, version=version)
        r = "ml_outlier"
        if isinstance(target_alert_rate, bool) or not isinstance(target_alert_rate, (int, float)) \
                or not 0 < target_alert_rate < 0.5:
            raise ValueError(f"{r}: target_alert_rate must be a number in (0, 0.5), got {target_alert_rate!r}")
        if isinstance(warmup_events, bool) or not isinstance(warmup_events, int) or warmup_events < 0:
            raise ValueError(f"{r}: warmup_events must be a non-negative integer, got {warmup_events!r}")
        for name, v in (("checkpoint_every", checkpoint_every), ("checkpoint_ttl_s", checkpoint_ttl_s),
                        ("forget_every", forget_every), ("learn_every", learn_every)):
            check_positive(r, name, v, integer=True)
        check_positive(r, "bins_per_unit", bins_per_unit)
        if isinstance(top_features, bool) or not isinstance(top_features, int) or not 1 <= top_features <= 5:
            raise ValueError(f"{r}: top_features must be an integer from 1 to 5, got {top_features!r}")
        if snapshot is not None and (not isinstance(snapshot, str) or not snapshot or ":" in snapshot
                                     or len(snapshot) > 64):
            raise ValueError(f"{r}: snapshot must be a name (1-64 characters, no ':') or null, got {snapshot!r}")
        if features is None:
            feats = DEFAULT_MODEL_FEATURES
        else:
            if isinstance(features, str) or not isinstance(features, (list, tuple)) or not features:
                raise ValueError(f"{r}: features must be a non-empty list of feature names, got {features!r}")
            unknown = [f for f in features if f not in F.FEATURES]
            if unknown:
                raise ValueError(f"{r}: features has unknown name(s) {unknown}; known: {', '.join(F.FEATURES)}")
            feats = tuple(dict.fromkeys(features))
        self.target_alert_rate = float(target_alert_rate)
        self.warmup_events = warmup_events
        self.checkpoint_every = checkpoint_every
        self.checkpoint_ttl_s = checkpoint_ttl_s
        self.bins_per_unit = float(bins_per_unit)
        self.forget_every = forget_every
        self.learn_every = learn_every
        self.top_features = top_features
        self.snapshot = snapshot
        self.features = feats
        self.resale = resale_prone
        #: hash of what a checkpoint must agree with to be restored
        self.model_config = hashlib.sha256(repr((self.target_alert_rate, self.bins_per_unit, self.forget_every,
                                                 self.features)).encode()).hexdigest()[:12]
        self._sha = self.sha(F.LUA)
        self._bins = FeatureBins(TailHBOS(self.bins_per_unit), self.features)
        #: the card's recent settlements live in a field of the per-card hash: 7 d + lateness after its last one
        self.card_ttl_s = F.WINDOWS_S[2] + lateness_s
        self._models: dict[tuple[str, int], PartitionModel] = {}   # least recently used first
        self._pending: dict[str, bytes] = {}     # model key -> checkpoint not yet written
        self._layout: dict[int, tuple[dict[str, bytes], list[tuple[int, bool]], list[tuple[int, float]]]] = {}
        #: called as ``score_sink(event, score, features)`` for every scored settlement (evaluation, tests)
        self.score_sink: Callable[[Settlement, float, dict[str, float]], None] | None = None
        #: wall and CPU time spent in this detector's Python (queue + collect), settlements covered
        self.cost = {"python_s": 0.0, "python_cpu_s": 0.0, "events": 0}

    def params(self) -> dict[str, Any]:
        p: dict[str, Any] = {"target_alert_rate": self.target_alert_rate, "warmup_events": self.warmup_events,
                             "checkpoint_every": self.checkpoint_every, "checkpoint_ttl_s": self.checkpoint_ttl_s,
                             "bins_per_unit": self.bins_per_unit, "forget_every": self.forget_every,
                             "learn_every": self.learn_every, "top_features": self.top_features,
                             "snapshot": self.snapshot}
        if self.features != DEFAULT_MODEL_FEATURES:
            p["features"] = list(self.features)
        return p

    # -- models -----------------------------------------------------------------------------
    def _fresh(self) -> PartitionModel:
        return PartitionModel(1.0 - self.target_alert_rate, self.bins_per_unit, self.forget_every)

    def _sync(self, run: str, part: int, blob: bytes | None, snap: bytes | None) -> PartitionModel:
        """Use the in-memory model unless Redis holds a newer one (restart, rebalance)."""
        mem = self._models.pop((run, part), None)
        for source, b in (("checkpoint", blob), ("snapshot", snap)):
            h = _header(b)
            if h is None:
                continue
            cfg, seen = h
            if cfg != self.model_config:
                log.warning("ml_outlier: %s of %s p%d is for another model configuration; not used", source, run, part)
                continue
            if mem is not None and (source == "snapshot" or seen <= mem.seen):
                break
            try:
                mem = load_model(b)  # type: ignore[arg-type]
                log.info("ml_outlier: model of %s p%d restored from its %s (%d settlements)", run, part, source, seen)
                break
            except Exception as exc:  # a bad checkpoint never stops the stream: start over
                log.error("ml_outlier: %s of %s p%d unreadable (%s); starting fresh", source, run, part, exc)
        if mem is None:
            mem = self._fresh()
        self._models[(run, part)] = mem  # most recently used last
        return mem

    def _evict(self) -> None:
        """Above ``max_models``, checkpoint the least recently used models and forget them (finished
        replays); call after a batch is learned. The next batch of theirs restores them."""
        while len(self._models) > self.max_models:
            old = next(iter(self._models))
            self.checkpoint(*old)
            del self._models[old]

    def checkpoint(self, run: str, part: int) -> bytes:
        """Checkpoint bytes of one in-memory model (also queued for the next round trip)."""
        m = self._models[(run, part)]
        blob = dump_model(m, self.model_config)
        m.since_checkpoint = 0
        self._pending[model_key(run, part)] = blob
        return blob

    async def save_checkpoints(self, redis: Any, run_id: str | None = None) -> int:
        """Write every in-memory model (of one run, or all) and every pending checkpoint now: for
        shutdown and tests."""
        for (run, part) in list(self._models):
            if run_id is None or run == run_id:
                self.checkpoint(run, part)
        prefix = None if run_id is None else model_key(run_id, 0)[:-1]
        n = 0
        for key in list(self._pending):
            if prefix is None or key.startswith(prefix):
                await redis.set(key, self._pending.pop(key), ex=self.checkpoint_ttl_s)
                n += 1
        return n

    def model(self, run: str, part: int) -> PartitionModel | None:
        return self._models.get((run, part))

    def adopt_state(self, previous: "MlOutlier") -> bool:
        """Take over the in-memory models of the detector this one replaces (rules reloaded), when the
        model configuration is the same; otherwise the models restart from their checkpoints."""
        if not isinstance(previous, MlOutlier) or previous.model_config != self.model_config:
            return False
        self._models.update(previous._models)
        self._pending.update(previous._pending)
        self.score_sink = self.score_sink or previous.score_sink
        return True

    # -- the Detector contract ----------------------------------------------------------------
    def queue(self, pipe: Any, events: Sequence[Settlement], ns: Namespace) -> int:
        if not events:
            return 0
        t0, c0 = time.perf_counter(), time.thread_time()
        pending = dict(self._pending)  # every run's: a finished replay's last checkpoints get written too
        for key, blob in pending.items():
            pipe.set(key, blob, ex=self.checkpoint_ttl_s)
        parts = []
        for p in sorted({ev.partition for ev in events}):
            pipe.get(model_key(ns.run_id, p))
            with_snap = bool(self.snapshot) and (ns.run_id, p) not in self._models
            if with_snap:
                pipe.get(snapshot_key(self.snapshot, p))  # type: ignore[arg-type]
            parts.append((p, with_snap))
        extras: list[tuple[int, float]] = []
        F.queue_windows(pipe, self._sha, events, self.key(ns), lateness_s=self.lateness_s,
                        card_prefix=ns.card_prefix(self.card_hash), resale=self.resale, extras=extras)
        if len(self._layout) > 64:  # batches that failed before collect
            self._layout.clear()
        self._layout[id(events)] = (pending, parts, extras)
        self.cost["python_s"] += time.perf_counter() - t0
        self.cost["python_cpu_s"] += time.thread_time() - c0
        return len(pending) + len(parts) + sum(w for _, w in parts) + 1

    def collect(self, events: Sequence[Settlement], replies: Sequence[Any], ns: Namespace) -> list[Alert]:
        if not events:
            return []
        t0, c0 = time.perf_counter(), time.thread_time()
        run = ns.run_id
        pending, parts, extras = self._layout.pop(id(events))
        for key, blob in pending.items():  # written: forget them unless a newer one is waiting
            if self._pending.get(key) is blob:
                del self._pending[key]
        i = len(pending)
        models: dict[int, PartitionModel] = {}
        for p, with_snap in parts:
            blob = replies[i]
            snap = replies[i + 1] if with_snap else None
            i += 2 if with_snap else 1
            models[p] = self._sync(run, p, blob, snap)
        tok = F.reply_tokens(replies[i])
        width = F.REPLY_WIDTH
        if len(tok) != width * len(events):
            raise RuntimeError(f"ml_outlier: feature script returned {len(tok)} numbers for {len(events)} events")
        bins = self._bins(events, tok, extras)
        new = [t == b"1" for t in tok[::width]]
        # the partitions' models are independent: run each over its own settlements, in batch order
        order: dict[int, list[int]] = {}
        if len(models) == 1:
            order[events[0].partition] = range(len(events))  # type: ignore[assignment]
        else:
            for j, ev in enumerate(events):
                order.setdefault(ev.partition, []).append(j)
        scores = [0.0] * len(events)
        sample = None
        if self.learn_every > 1:  # by the event id: the same settlements on every replay, redelivery or restore
            k = self.learn_every
            sample = [zlib.crc32(ev.event_id.encode()) % k == 0 for ev in events]
        hits: list[tuple[int, float, dict[str, float]]] = []
        for p, idx in order.items():
            hits += models[p].run(idx, bins, new, self.features, scores, warmup=self.warmup_events, sample=sample)
        resale = self.resale
        sink = self.score_sink
        xs: dict[int, dict[str, float]] = {}
        if sink is not None:
            for j, ev in enumerate(events):
                x = xs[j] = F.features(ev, F.Window.from_tokens(tok, j * width), resale)
                sink(ev, scores[j], x)
        flagged: list[tuple[Settlement, float, float, dict[str, float], dict[str, float]]] = []
        for j, thr, terms in sorted(hits, key=lambda h: h[0]):
            ev = events[j]
            x = xs.get(j) or F.features(ev, F.Window.from_tokens(tok, j * width), resale)
            flagged.append((ev, scores[j], thr, x, terms))
        for p, m in models.items():
            if m.since_checkpoint >= self.checkpoint_every:
                self.checkpoint(run, p)
        self._evict()
        if _M is not None:
            try:
                _M.model_threshold.set(min(m.threshold() for m in models.values()))
                for s in scores[::16]:
                    _M.model_score.observe(s)
            except Exception:  # metrics never break detection
                pass
        alerts = self._alerts(ns, flagged)
        self.cost["python_s"] += time.perf_counter() - t0
        self.cost["python_cpu_s"] += time.thread_time() - c0
        self.cost["events"] += len(events)
        return alerts

    # -- alerts -----------------------------------------------------------------------------
    def _alerts(self, ns: Namespace, flagged: Iterable[tuple]) -> list[Alert]:
        """One alert per card and local day; later flagged settlements of that day extend it."""
        out: dict[str, Alert] = {}
        for ev, score, thr, x, contrib in flagged:
            day = F.local_day(ev.ts)
            aid = alert_id(ns.run_id, self.rule, "card", ev.card_id, "86400", str(day))
            top = sorted(contrib.items(), key=lambda kv: (-kv[1], kv[0]))[: self.top_features]
            zh_terms = "、".join(f"{F.FEATURES[k][0]} {_fmt(k, x[k])}" for k, _ in top)
            en_terms = ", ".join(f"{F.FEATURES[k][1]} {_fmt(k, x[k])}" for k, _ in top)
            zh = (f"卡 {ev.card_id} 的结算 {ev.event_id} 异常度 {score:.2f}（阈值 {thr:.2f}），"
                  f"主要因素：{zh_terms}")
            en = (f"Card {ev.card_id} settlement {ev.event_id} is an outlier (score {score:.2f}, threshold "
                  f"{thr:.2f}); driven by {en_terms}")
            t = iso(ev.ts)
            ids = [ev.event_id]
            start = end = t
            prev = out.get(aid)
            if prev is not None:
                ids = list(dict.fromkeys(prev.evidence_event_ids + ids))
                start, end = min(prev.window_start, t), max(prev.window_end, t)
            out[aid] = Alert(
                alert_id=aid, rule=self.rule, rule_version=self.version,
                severity=severity_for(score / thr if thr > 0 else 1.0), score=round(score, 4),
                subject_type="card", subject_id=ev.card_id, window_start=start, window_end=end,
                evidence_event_ids=ids, run_id=ns.run_id, summary=zh if self.lang == "zh" else en, summary_en=en,
                detected_at=now_iso(), window_s=86400,
                metrics={"score": round(score, 4), "threshold": round(thr, 4), "partition": ev.partition,
                         "event_id": ev.event_id,
                         "top_features": [{"name": k, "value": x[k], "contribution": round(c, 4)} for k, c in top],
                         "features": x},
            )
        return list(out.values())
