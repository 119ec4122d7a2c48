"""A deterministic synthetic Shanghai-like city of medical-insurance settlements (医保结算).

The generator builds a city (16 districts, hospitals of grade 1-3 with departments,
community health centres 社区卫生服务中心, pharmacies, physicians, a drug catalogue and
insured cards), lets its people live ordinary lives for a number of days and injects
labelled fraud of every built-in rule on top.

Ordinary behaviour is the hard part: the look-alikes a rule must *not* fire on are all
here — chronic patients refilling monthly (some with an approved long prescription
长处方), dialysis patients three times a week (N18.5), elderly patients seeing several
specialists, same-day referrals community → hospital, families buying together at one
pharmacy, busy level-3 physicians, inpatient stays with interim bills.  Every ordinary
card's day is scheduled as one trip, so its settlements are always far enough apart in
time for the distance between them (no impossible travel), an ordinary card never
settles anywhere while it is in hospital, and ordinary trace codes are unique.

Everything derives from ``seed`` through private :class:`random.Random` instances keyed
on (seed, purpose, calendar day), never the global generator: the same seed gives the
same bytes, and ordinary life is a function of the calendar day, so :func:`iter_live`
chunk after chunk agrees with :func:`generate` over the same days (only the injected
fraud differs per chunk).

Public API: :class:`City`, :func:`build_city`, :func:`generate`, :func:`write`,
:func:`iter_live` and :func:`generate_day_fast` (throughput benchmark source).

Labels (``generate(...)[1]``, JSON-serialisable)::

    {"seed", "cards", "days", "start", "end", "n_events",
     "frauds": [{"fraud_id": "F0001", "rule": "card_hopping",
                 "subject_type": "card|physician|institution|ring", "subject_id": "...",
                 "member_ids": [card ids involved], "event_ids": [...],
                 "window_start": ..., "window_end": ..., "note": "...",
                 # optional, per rule: "kind" (card_hopping 24h|7d; shared_card
                 # impossible_travel|inpatient_overlap|child_adult_drug; visit_frequency A|B),
                 # "context_event_ids" (the inpatient stay a misuse overlaps),
                 # "also_rules" (other rules this fraud legitimately trips), "drug",
                 # "institution_id", "trace_codes", "baseline_per_day", ...}],
     "fraud_event_ids": [every event id of every fraud],
     "lookalikes": [{"kind": "dialysis|family|chronic_long_rx|busy_physician|referral|multi_specialist",
                     "subject_id": card, physician or family id, "member_ids"?: [...], "note": ...}]}

Subjects: card frauds -> the card_id; prescriber_volume -> physician_id;
duplicate_billing / trace_code_reuse -> the institution that billed twice / resold;
card_ring -> ``RING-{pharmacy}-{drug}`` with the cards in member_ids.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import math
import random
import zlib
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import orjson

__all__ = [
    "City", "Card", "District", "Institution", "Physician", "Drug", "DISTRICTS", "DRUGS",
    "DEFAULT_START", "TZ", "build_city", "generate", "write", "iter_live", "generate_day_fast",
    "district_distance_km", "RULES",
]

TZ = timezone(timedelta(hours=8))
DEFAULT_START = datetime(2026, 11, 1, tzinfo=TZ)
REFERENCE_YEAR = 2026            # ages and insured categories are computed for this year
_TZ_S = 8 * 3600
_EPOCH_ORD = date(1970, 1, 1).toordinal()

RULES = ("card_hopping", "overdispensing", "shared_card", "card_ring", "prescriber_volume",
         "visit_frequency", "cost_anomaly", "duplicate_billing", "trace_code_reuse")

# ----------------------------------------------------------------------------- hashing

_M64 = (1 << 64) - 1


def _mix(x: int) -> int:
    """splitmix64 finaliser: a fast, well-spread 64-bit integer hash."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _key(*parts: int | str) -> int:
    """Stable 64-bit key from ints and strings (never Python's salted ``hash``)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        if isinstance(p, str):
            p = zlib.crc32(p.encode()) | (len(p) << 32)
        h = _mix(h ^ (p & _M64))
    return h


def _rng(*parts: int | str) -> random.Random:
    return random.Random(_key(*parts))


_E13 = 10**13


def _scramble13(x: int) -> int:
    """A bijection of [0, 10**13): unique counters in, unique random-looking serials out."""
    for a, b, r in ((7_777_777_777_77, 1_234_567_890_123, 10**6), (3_141_592_653_59, 2_718_281_828_459, 10**5),
                    (1_618_033_988_77, 5_772_156_649_015, 10**7), (2_236_067_977_49, 1_414_213_562_373, 10**4)):
        x = (x * a + b) % _E13
        x = (x % r) * (_E13 // r) + x // r
    return x


# ----------------------------------------------------------------------------- districts

@dataclass(frozen=True)
class District:
    code: str
    name: str
    short: str
    lat: float
    lon: float
    population_m: float      # insured population, millions (drives where people live)
    spread_deg: float        # how far institutions lie from the centroid


DISTRICTS: tuple[District, ...] = (
    District("310101", "黄浦区", "黄浦", 31.2317, 121.4846, 0.66, 0.012),
    District("310104", "徐汇区", "徐汇", 31.1796, 121.4375, 1.11, 0.02),
    District("310105", "长宁区", "长宁", 31.2204, 121.3935, 0.69, 0.015),
    District("310106", "静安区", "静安", 31.2636, 121.4539, 0.98, 0.015),
    District("310107", "普陀区", "普陀", 31.2495, 121.3972, 1.24, 0.015),
    District("310109", "虹口区", "虹口", 31.2726, 121.4886, 0.76, 0.012),
    District("310110", "杨浦区", "杨浦", 31.2830, 121.5261, 1.24, 0.015),
    District("310112", "闵行区", "闵行", 31.0934, 121.3817, 2.65, 0.04),
    District("310113", "宝山区", "宝山", 31.3989, 121.4089, 2.24, 0.04),
    District("310114", "嘉定区", "嘉定", 31.3568, 121.2657, 1.83, 0.04),
    District("310115", "浦东新区", "浦东", 31.1812, 121.6223, 5.68, 0.06),
    District("310116", "金山区", "金山", 30.7920, 121.2510, 0.82, 0.04),
    District("310117", "松江区", "松江", 31.0320, 121.2278, 1.91, 0.04),
    District("310118", "青浦区", "青浦", 31.1309, 121.0970, 1.27, 0.04),
    District("310120", "奉贤区", "奉贤", 30.9180, 121.5180, 1.14, 0.04),
    District("310151", "崇明区", "崇明", 31.6230, 121.5650, 0.63, 0.05),
)
_DISTRICT_BY_CODE = {d.code: d for d in DISTRICTS}
_CENTRAL = {"310101", "310104", "310105", "310106", "310107", "310109", "310110"}


def _haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6371.0 * math.asin(math.sqrt(a))


def district_distance_km(a: str, b: str) -> float:
    """Great-circle distance between two district centroids, km.

    >>> round(district_distance_km("310151", "310120"))
    79
    """
    da, db = _DISTRICT_BY_CODE[a], _DISTRICT_BY_CODE[b]
    return _haversine_km(da.lat, da.lon, db.lat, db.lon)


# ----------------------------------------------------------------------------- catalogue

@dataclass(frozen=True)
class Drug:
    code: str
    name: str
    unit_price: float        # CNY per package
    days_supply: int         # days of treatment one package covers
    resale_prone: bool = False
    otc: bool = False        # sold at pharmacies without a prescription visit
    child_ok: bool = False
    trace_prefix: str = ""   # 7-digit product prefix of its 20-digit trace codes


def _drugs() -> dict[str, Drug]:
    rows = [
        # code, name, price, days/package, resale, otc, child
        ("XA10BAA001", "盐酸二甲双胍片", 9.5, 30, False, False, False),
        ("XB01ACA002", "硫酸氢氯吡格雷片", 96.0, 28, True, False, False),
        ("XC10AAA003", "阿托伐他汀钙片", 89.5, 28, True, False, False),
        ("XA10AEA004", "甘精胰岛素注射液", 178.0, 15, True, False, False),
        ("XJ05AFA005", "恩替卡韦片", 168.0, 28, True, False, False),
        ("XB01AFA006", "利伐沙班片", 198.0, 28, True, False, False),
        ("XC08CAA007", "苯磺酸氨氯地平片", 12.6, 28, False, False, False),
        ("XC09CAA008", "缬沙坦胶囊", 23.4, 28, False, False, False),
        ("XC07ABA009", "酒石酸美托洛尔片", 6.8, 30, False, False, False),
        ("XA10BBA010", "格列美脲片", 18.2, 30, False, False, False),
        ("XR05CBA011", "氨溴索口服溶液", 11.0, 7, False, True, True),
        ("XA10BFA012", "阿卡波糖片", 27.9, 30, False, False, False),
        ("XC09DAA013", "厄贝沙坦氢氯噻嗪片", 31.5, 28, False, False, False),
        ("ZC05AAA014", "复方丹参滴丸", 26.0, 30, False, False, False),
        ("XJ01CAA015", "阿莫西林胶囊", 8.5, 7, False, False, True),
        ("XJ01DCA016", "头孢克洛缓释片", 24.0, 5, False, False, True),
        ("XM01AEA017", "布洛芬缓释胶囊", 12.5, 5, False, True, False),
        ("XR06AXA018", "氯雷他定片", 15.0, 10, False, True, True),
        ("XA02BCA019", "奥美拉唑肠溶胶囊", 16.0, 14, False, True, False),
        ("XN02BEA020", "对乙酰氨基酚片", 5.0, 3, False, True, True),
        ("ZA01AAA021", "连花清瘟胶囊", 14.8, 5, False, True, False),
        ("XD07ACA022", "糠酸莫米松乳膏", 19.6, 14, False, True, True),
        ("XS01AEA023", "左氧氟沙星滴眼液", 18.0, 7, False, False, True),
        ("XM02AAA024", "双氯芬酸二乙胺乳胶剂", 22.0, 10, False, True, False),
        ("XA07BCA025", "蒙脱石散", 9.8, 3, False, True, True),
        ("XJ01MAA026", "左氧氟沙星片", 21.0, 7, False, False, False),
        ("XR03ACA027", "沙丁胺醇气雾剂", 25.0, 30, False, False, True),
        ("XB03XAA028", "重组人促红素注射液", 68.0, 7, False, False, False),
        ("XB01ABA029", "肝素钠注射液", 12.0, 1, False, False, False),
        ("XB05AAA030", "人血白蛋白", 458.0, 1, False, False, False),
        ("XL03AXA031", "注射用胸腺法新", 225.0, 1, False, False, False),
        ("XN07XXA032", "注射用鼠神经生长因子", 312.0, 1, False, False, False),
        ("XJ01DDA033", "注射用头孢曲松钠", 38.0, 1, False, False, False),
        ("XB05BBA034", "氯化钠注射液", 4.5, 1, False, False, False),
        ("XC01DAA035", "硝酸甘油片", 8.0, 30, False, False, False),
    ]
    out = {}
    for k, (code, name, price, days, resale, otc, child) in enumerate(rows):
        prefix = f"8{(104729 + k * 7919) % 900000 + 100000:06d}"
        out[code] = Drug(code, name, price, days, resale, otc, child, prefix)
    return out


DRUGS: dict[str, Drug] = _drugs()
RESALE_PRONE: tuple[str, ...] = tuple(c for c, d in DRUGS.items() if d.resale_prone)
STATIN, CLOPIDOGREL, INSULIN, ENTECAVIR, RIVAROXABAN = (
    "XC10AAA003", "XB01ACA002", "XA10AEA004", "XJ05AFA005", "XB01AFA006")
METFORMIN, AMLODIPINE, VALSARTAN, METOPROLOL, GLIMEPIRIDE = (
    "XA10BAA001", "XC08CAA007", "XC09CAA008", "XC07ABA009", "XA10BBA010")
AMBROXOL, ACARBOSE, IRBESARTAN, DANSHEN, AMOXICILLIN = (
    "XR05CBA011", "XA10BFA012", "XC09DAA013", "ZC05AAA014", "XJ01CAA015")
CEFACLOR, IBUPROFEN, LORATADINE, OMEPRAZOLE, PARACETAMOL = (
    "XJ01DCA016", "XM01AEA017", "XR06AXA018", "XA02BCA019", "XN02BEA020")
LIANHUA, MOMETASONE, LEVO_DROPS, DICLOFENAC, SMECTITE = (
    "ZA01AAA021", "XD07ACA022", "XS01AEA023", "XM02AAA024", "XA07BCA025")
LEVO_TAB, SALBUTAMOL, EPO, HEPARIN, ALBUMIN = (
    "XJ01MAA026", "XR03ACA027", "XB03XAA028", "XB01ABA029", "XB05AAA030")
THYMALFASIN, NGF, CEFTRIAXONE, SALINE, NITRO = (
    "XL03AXA031", "XN07XXA032", "XJ01DDA033", "XB05BBA034", "XC01DAA035")

# services: code -> (name, category, price)
SERVICES: dict[str, tuple[str, str, float]] = {
    "R0001": ("普通门诊挂号", "registration", 20.0),
    "R0002": ("急诊挂号", "registration", 30.0),
    "R0003": ("专家门诊挂号", "registration", 50.0),
    "J0001": ("血常规", "exam", 22.0),
    "J0002": ("尿常规", "exam", 15.0),
    "J0003": ("肝功能", "exam", 78.0),
    "J0004": ("肾功能", "exam", 45.0),
    "J0005": ("血糖测定", "exam", 8.0),
    "J0006": ("糖化血红蛋白测定", "exam", 70.0),
    "J0007": ("常规心电图", "exam", 30.0),
    "J0008": ("X线摄影", "exam", 80.0),
    "J0009": ("彩色多普勒超声", "exam", 180.0),
    "J0010": ("CT平扫", "exam", 320.0),
    "J0011": ("磁共振成像", "exam", 680.0),
    "J0012": ("血脂四项", "exam", 60.0),
    "J0013": ("C反应蛋白测定", "exam", 35.0),
    "J0014": ("乙肝病毒DNA定量", "exam", 180.0),
    "J0015": ("眼底检查", "exam", 40.0),
    "T0001": ("静脉输液", "treatment", 15.0),
    "T0002": ("清创缝合", "treatment", 120.0),
    "T0003": ("针灸", "treatment", 40.0),
    "T0004": ("雾化吸入", "treatment", 20.0),
    "T0005": ("护理费", "treatment", 30.0),
    "T0101": ("血液透析", "treatment", 410.0),
    "T0201": ("阑尾切除术", "treatment", 1850.0),
    "T0202": ("经皮冠状动脉支架置入术", "treatment", 9800.0),
    "T0203": ("阴道分娩", "treatment", 1200.0),
    "T0204": ("人工髋关节置换术", "treatment", 4500.0),
    "T0205": ("腹腔镜胆囊切除术", "treatment", 2600.0),
    "T0206": ("胸腔镜肺叶切除术", "treatment", 6800.0),
    "M0001": ("一次性输液器", "material", 5.0),
    "M0002": ("血液透析器", "material", 185.0),
    "M0003": ("医用敷料", "material", 12.0),
    "M0101": ("药物洗脱支架", "material", 5800.0),
    "M0102": ("人工髋关节假体", "material", 16800.0),
    "B0001": ("床位费", "bed", 80.0),
    "O0001": ("住院诊查费", "other", 20.0),
}
_REG_PRICE = {("community", 1): 14.0, ("hospital", 1): 16.0, ("hospital", 2): 22.0, ("hospital", 3): 30.0}
_BED_PRICE = {1: 50.0, 2: 70.0, 3: 90.0}


@dataclass(frozen=True)
class Dx:
    """A diagnosis (ICD-10) with the departments that treat it and what it is billed with."""
    code: str
    depts: tuple[str, ...]
    drugs: tuple[str, ...]
    exams: tuple[str, ...] = ()
    treats: tuple[str, ...] = ()
    weight: float = 1.0
    min_age: int = 0
    max_age: int = 120


ADULT_DX = (
    Dx("J06.9", ("呼吸内科", "内科", "全科"), (AMBROXOL, AMOXICILLIN, LIANHUA, PARACETAMOL, LORATADINE), ("J0001", "J0013"), weight=22),
    Dx("J20.9", ("呼吸内科", "内科", "全科"), (AMBROXOL, CEFACLOR, LEVO_TAB), ("J0001", "J0008"), weight=10),
    Dx("K29.7", ("消化内科", "内科", "全科"), (OMEPRAZOLE,), ("J0009",), weight=9),
    Dx("K52.9", ("消化内科", "内科", "全科"), (SMECTITE, OMEPRAZOLE), ("J0001",), weight=6),
    Dx("M54.5", ("骨科", "外科", "全科"), (IBUPROFEN, DICLOFENAC), ("J0008",), ("T0003",), weight=8),
    Dx("M17.9", ("骨科", "外科", "全科"), (DICLOFENAC, IBUPROFEN), ("J0008",), ("T0003",), weight=6, min_age=50),
    Dx("L30.9", ("皮肤科", "全科"), (MOMETASONE, LORATADINE), (), weight=5),
    Dx("H10.9", ("眼科", "全科"), (LEVO_DROPS,), (), weight=4),
    Dx("N39.0", ("内科", "全科"), (LEVO_TAB,), ("J0002",), weight=4),
    Dx("R51", ("神经内科", "内科", "全科"), (IBUPROFEN, PARACETAMOL), ("J0010",), weight=3),
    Dx("I10", ("心血管内科", "内科", "全科"), (AMLODIPINE, VALSARTAN), ("J0007",), weight=5, min_age=30),
    Dx("E11.9", ("内分泌科", "内科", "全科"), (METFORMIN,), ("J0005", "J0006"), weight=3, min_age=30),
)
CHILD_DX = (
    Dx("J06.9", ("儿科", "全科"), (AMBROXOL, AMOXICILLIN, PARACETAMOL, LORATADINE), ("J0001", "J0013"), weight=30),
    Dx("J20.9", ("儿科", "全科"), (AMBROXOL, CEFACLOR), ("J0001", "J0008"), ("T0004",), weight=12),
    Dx("R50.9", ("儿科", "全科"), (PARACETAMOL,), ("J0001", "J0013"), weight=10),
    Dx("A09", ("儿科", "全科"), (SMECTITE,), ("J0001",), weight=6),
    Dx("J45.9", ("儿科", "全科"), (SALBUTAMOL,), (), ("T0004",), weight=3),
    Dx("L30.9", ("皮肤科", "儿科", "全科"), (MOMETASONE,), (), weight=4),
    Dx("H10.9", ("眼科", "儿科", "全科"), (LEVO_DROPS,), (), weight=3),
)
EMERGENCY_DX = (
    Dx("R10.4", ("急诊科",), (OMEPRAZOLE,), ("J0001", "J0009"), weight=10),
    Dx("R50.9", ("急诊科",), (PARACETAMOL, CEFTRIAXONE), ("J0001", "J0013"), ("T0001",), weight=10),
    Dx("S61.0", ("急诊科",), (), (), ("T0002",), weight=5),
    Dx("J18.9", ("急诊科",), (CEFTRIAXONE, LEVO_TAB), ("J0001", "J0008", "J0013"), ("T0001",), weight=6),
    Dx("I20.0", ("急诊科",), (NITRO,), ("J0007", "J0001"), weight=3, min_age=40),
    Dx("T78.4", ("急诊科",), (LORATADINE,), (), weight=4),
    Dx("S93.4", ("急诊科",), (IBUPROFEN,), ("J0008",), weight=5),
)
# inpatient: code, depts, LOS range, procedure items, min_age, max_age, gender, weight
INPATIENT_DX = (
    ("K35.8", ("普外科", "外科"), (3, 6), ("T0201",), 10, 80, None, 8),
    ("J18.9", ("呼吸内科", "内科"), (5, 10), (), 0, 120, None, 12),
    ("I63.9", ("神经内科", "内科"), (8, 16), (), 50, 120, None, 10),
    ("I21.9", ("心血管内科", "内科"), (6, 11), ("T0202", "M0101"), 45, 120, None, 6),
    ("S72.0", ("骨科", "外科"), (9, 18), ("T0204", "M0102"), 65, 120, None, 5),
    ("O80", ("妇产科",), (2, 4), ("T0203",), 22, 42, "F", 7),
    ("K80.2", ("普外科", "外科"), (4, 7), ("T0205",), 30, 90, None, 6),
    ("C34.9", ("肿瘤科", "呼吸内科", "内科"), (7, 14), ("T0206",), 45, 90, None, 4),
)
# chronic conditions: name -> (dx, department, drug choices)
_CHRONIC_DX = {"htn": ("I10", "心血管内科"), "dm": ("E11.9", "内分泌科"), "cad": ("I25.1", "心血管内科"),
               "lipid": ("E78.5", "心血管内科"), "hbv": ("B18.1", "感染科"), "af": ("I48", "心血管内科")}
_DRUG_DX = {STATIN: ("E78.5", "心血管内科"), CLOPIDOGREL: ("I25.1", "心血管内科"),
            INSULIN: ("E11.9", "内分泌科"), ENTECAVIR: ("B18.1", "感染科"),
            RIVAROXABAN: ("I48", "心血管内科")}
_DEPT_FALLBACK = ("内科", "全科", "外科")

# hour-of-day weights (local time)
_H_OUTPATIENT = (0, 0, 0, 0, 0, 0, 0.2, 2, 10, 12, 11, 8, 3, 6, 9, 8, 6, 2, 1, 1, 0.5, 0, 0, 0)
_H_COMMUNITY = (0, 0, 0, 0, 0, 0, 0.1, 4, 12, 11, 9, 5, 1, 5, 7, 6, 3, 0.5, 0, 0, 0, 0, 0, 0)
_H_PHARMACY = (0.1, 0.05, 0.05, 0.05, 0.05, 0.1, 0.3, 2, 5, 7, 7, 6, 5, 5, 5, 5, 6, 7, 7, 6, 4, 2, 0.6, 0.2)
_H_EMERGENCY = (1.5, 1.2, 1, 0.8, 0.8, 1, 1.5, 2.5, 4, 5, 5, 4.5, 4, 4, 4, 4.5, 5, 5.5, 6, 6, 5, 4, 3, 2)


def _cum(ws: Sequence[float]) -> list[float]:
    out, s = [], 0.0
    for w in ws:
        s += w
        out.append(s)
    return out


_C_OUTPATIENT, _C_COMMUNITY, _C_PHARMACY, _C_EMERGENCY = (
    _cum(_H_OUTPATIENT), _cum(_H_COMMUNITY), _cum(_H_PHARMACY), _cum(_H_EMERGENCY))


def _tod(rng: random.Random, cum: list[float]) -> int:
    """Seconds after local midnight drawn from an hour profile."""
    h = bisect.bisect_right(cum, rng.random() * cum[-1])
    return min(h, 23) * 3600 + rng.randrange(3600)


def _wchoice(rng: random.Random, items: Sequence[Any], weights: Sequence[float]) -> Any:
    return items[bisect.bisect_right(_cum(weights), rng.random() * sum(weights))]


_ADULT_DX_W = [d.weight for d in ADULT_DX]
_CHILD_DX_W = [d.weight for d in CHILD_DX]
_EMERG_DX_W = [d.weight for d in EMERGENCY_DX]


_DX_CUM: dict[int, list[float]] = {}


def _pick_dx(rng: random.Random, table: Sequence[Dx], age: int) -> Dx:
    cum = _DX_CUM.get(id(table))
    if cum is None:
        cum = _DX_CUM[id(table)] = _cum([x.weight for x in table])
    while True:
        d = table[bisect.bisect_right(cum, rng.random() * cum[-1])]
        if d.min_age <= age <= d.max_age:
            return d


# ----------------------------------------------------------------------------- cards

@dataclass(frozen=True, slots=True)
class Card:
    index: int
    card_id: str
    person_id: str | None
    birth_year: int
    gender: str
    insured_category: str
    home_district: str

    @property
    def age(self) -> int:
        return REFERENCE_YEAR - self.birth_year


def _age_weight(age: int) -> float:
    if age < 0:
        return 0.0
    if age <= 2:
        return 0.8
    if age < 18:
        return 1.0
    if age < 30:
        return 1.15
    if age < 60:
        return 1.5
    if age < 75:
        return 1.65
    if age < 85:
        return 1.0
    if age < 95:
        return 0.45
    return 0.08 if age <= 100 else 0.0


class CardTable(Sequence[Card]):
    """All insured cards of the city, derived from their index on demand (nothing stored).

    Card ``i`` is a pure function of (seed, i): card ids are unique by construction
    (``3101`` + birth date + 4 digits, the 4 digits a bijection of the rank within the
    birth date), birth dates follow an insured-population age pyramid, the home district
    follows district populations, and the insured category is consistent with age.
    """

    _FIRST_BIRTH = date(1926, 1, 1)
    _LAST_BIRTH = date(2026, 9, 30)

    def __init__(self, n: int, seed: int):
        if not 1 <= n <= 50_000_000:
            raise ValueError(f"cards must be between 1 and 50,000,000, got {n}")
        self._n = n
        self._seed = seed
        self._hseed = _key(seed, "card")
        self._salt = _key(seed, "suffix") % 10000
        a = int(n * 0.6180339887) | 1
        while math.gcd(a, n) != 1:
            a += 2
        self._a = a % n if n > 1 else 1
        self._b = _key(seed, "perm") % n
        first, last = self._FIRST_BIRTH.toordinal(), self._LAST_BIRTH.toordinal()
        ws = []
        self._dates: list[tuple[int, int, int]] = []
        for o in range(first, last + 1):
            d = date.fromordinal(o)
            self._dates.append((d.year, d.month, d.day))
            ws.append(_age_weight(REFERENCE_YEAR - d.year))
        total = sum(ws)
        cum, s = [], 0.0
        for w in ws:
            s += w
            cum.append(int(round(n * s / total)))
        cum[-1] = n
        self._cum = cum
        self._dcum = _cum([d.population_m for d in DISTRICTS])
        self._cache: dict[int, Card] = {}

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        c = self._cache.get(i)
        if c is None:
            c = Card(i, *self.fields(i))
            self._cache[i] = c
        return c

    def __iter__(self) -> Iterator[Card]:
        for i in range(self._n):
            yield self[i]

    def fields(self, i: int) -> tuple[str, str | None, int, str, str, str]:
        """(card_id, person_id, birth_year, gender, insured_category, home_district) of card ``i``."""
        n = self._n
        if not 0 <= i < n:
            raise IndexError(i)
        r = (i * self._a + self._b) % n
        k = bisect.bisect_right(self._cum, r)
        within = r - (self._cum[k - 1] if k else 0)
        y, m, d = self._dates[k]
        suffix = (within * 7919 + k * 37 + self._salt) % 10000
        h = _mix(self._hseed ^ i)
        gender = "M" if h & 1 else "F"
        u = ((h >> 8) & 0xFFFFFF) / 16777216.0
        district = DISTRICTS[bisect.bisect_right(self._dcum, u * self._dcum[-1])].code
        age = REFERENCE_YEAR - y
        uc = ((h >> 32) & 0xFFFF) / 65536.0
        if age < 18:
            cat = "child"
        elif age <= 22:
            cat = "resident" if uc < 0.6 else "employee"
        elif age >= (60 if gender == "M" else 55):
            cat = "retiree" if uc < 0.82 else "resident"
        else:
            cat = "employee" if uc < 0.84 else "resident"
        pid = None if ((h >> 48) & 0xFF) < 10 else f"p{(h * 0xD6E8FEB86659FD93 + self._salt) & _M64:016x}"
        return f"3101{y:04d}{m:02d}{d:02d}{suffix:04d}", pid, y, gender, cat, district


# ----------------------------------------------------------------------------- institutions

@dataclass(frozen=True)
class Institution:
    index: int
    institution_id: str
    name: str
    type: str                       # hospital | community | pharmacy
    level: int | None               # 1-3; community centres are level 1; pharmacies None
    district: str
    departments: tuple[str, ...]
    lat: float
    lon: float
    attractiveness: float


@dataclass(frozen=True)
class Physician:
    physician_id: str
    institution: int                # index into City.institutions
    department: str
    busy: bool
    weight: float


@dataclass(frozen=True)
class ChronicPlan:
    card: int
    conditions: tuple[str, ...]
    drugs: tuple[str, ...]
    interval_days: int              # refill every ~interval days (long prescription: 56-90)
    phase: int
    venue: int                      # institution index
    long_rx: bool


@dataclass(frozen=True)
class DialysisPlan:
    card: int
    hospital: int
    weekdays: tuple[int, ...]       # 0 = Monday
    end_tod: int                    # settlement time (end of the 4-h session), s after midnight


_L3_DEPTS = ("心血管内科", "内分泌科", "呼吸内科", "消化内科", "神经内科", "肾内科", "感染科", "普外科",
             "骨科", "儿科", "妇产科", "眼科", "皮肤科", "急诊科", "中医科", "肿瘤科")
_L2_DEPTS = ("内科", "心血管内科", "内分泌科", "呼吸内科", "肾内科", "普外科", "骨科", "儿科", "妇产科",
             "急诊科", "中医科", "眼科", "皮肤科")
_L1_DEPTS = ("内科", "外科", "全科", "中医科")
_COMMUNITY_DEPTS = ("全科", "中医科", "康复科")
_CN_NUM = "一二三四五六七八九十"
_STREETS = ("江川路", "新华路", "长风", "曹家渡", "彭浦", "临汾路", "大宁", "四川北路", "殷行", "五角场",
            "古美", "莘庄", "梅陇", "罗店", "大场", "南翔", "安亭", "金桥", "花木", "张江", "川沙", "惠南",
            "石化", "朱泾", "方松", "泗泾", "赵巷", "朱家角", "南桥", "庄行", "城桥", "堡镇", "天平", "枫林",
            "虹桥", "仙霞", "石门二路", "宝山路", "半淞园", "打浦桥", "真如", "甘泉", "江湾", "定海路")
_CHAINS = ("华氏大药房", "雷允上药房", "第一医药", "益丰大药房", "国大药房", "童涵春堂", "余天成堂",
           "养和堂", "复美大药房", "老百姓大药房")
_ODD_NAMES = ("<b>{n}</b>", "{n}\u200b", "{n}（原{s}区卫生院）", "{n}&分店", "{n} 🏥", "{n}\u3000",
              "{n}<img src=x onerror=alert(1)>", "\"{n}\"", "{n}\\旧址")


@dataclass(repr=False)
class City:
    """The synthetic city: where everything is and who is insured.

    ``cards`` is a lazy :class:`CardTable` (derived from the index), so a city of
    millions of cards costs nothing until a card is looked at.  The persona lists
    (chronic patients, dialysis, families, multi-specialist elderly) are empty for a
    city built with ``personas=False`` (the fast benchmark path).
    """
    seed: int
    n_cards: int
    districts: tuple[District, ...]
    institutions: list[Institution]
    physicians: list[Physician]
    drugs: dict[str, Drug]
    cards: CardTable
    chronic: dict[int, ChronicPlan] = field(default_factory=dict)
    dialysis: list[DialysisPlan] = field(default_factory=list)
    families: list[tuple[tuple[int, ...], int]] = field(default_factory=list)   # (members, pharmacy)
    multi_specialist: list[int] = field(default_factory=list)
    persona_cards: frozenset[int] = frozenset()
    neighbours: dict[str, tuple[str, ...]] = field(default_factory=dict)
    phys_by_inst_dept: dict[tuple[int, str], tuple[list[Physician], list[float]]] = field(default_factory=dict)
    _cand_cache: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"City(seed={self.seed}, cards={self.n_cards}, institutions={len(self.institutions)}, "
                f"physicians={len(self.physicians)}, chronic={len(self.chronic)}, "
                f"dialysis={len(self.dialysis)}, families={len(self.families)})")

    # -- look-ups used by the generator ------------------------------------------------
    def candidates(self, district: str, itype: str, min_level: int = 0,
                   dept: str | None = None) -> tuple[list[int], list[float]]:
        key = (district, itype, min_level, dept)
        got = self._cand_cache.get(key)
        if got is None:
            lst = [i.index for i in self.institutions
                   if i.district == district and i.type == itype and (i.level or 0) >= min_level
                   and (dept is None or dept in i.departments)]
            got = (lst, _cum([self.institutions[j].attractiveness for j in lst]))
            self._cand_cache[key] = got
        return got

    def pick_institution(self, rng: random.Random, home: str, itype: str, min_level: int = 0,
                         dept: str | None = None, away_p: float = 0.22) -> Institution:
        d = home if rng.random() >= away_p else self.neighbours[home][rng.randrange(4)]
        for dist in (d, *self.neighbours[d]):
            lst, cum = self.candidates(dist, itype, min_level, dept)
            if lst:
                return self.institutions[lst[bisect.bisect_right(cum, rng.random() * cum[-1])]]
        raise LookupError(f"no {itype} (level >= {min_level}, dept {dept}) anywhere")

    def department(self, inst: Institution, prefs: Sequence[str]) -> str:
        for p in (*prefs, *_DEPT_FALLBACK):
            if p in inst.departments:
                return p
        return inst.departments[0]

    def pick_physician(self, rng: random.Random, inst: Institution, dept: str) -> str:
        lst, cum = self.phys_by_inst_dept[(inst.index, dept)]
        return lst[bisect.bisect_right(cum, rng.random() * cum[-1])].physician_id


def _n_institutions(cards: int) -> int:
    return max(80, cards // 3000)


def build_city(cards: int, seed: int, *, personas: bool = True) -> City:
    """Build the city for ``cards`` insured cards (deterministic for ``seed``).

    About one institution per 3,000 insured, never fewer than 80 (each district has at
    least one hospital, one community centre and two pharmacies), so a card can hop.

    >>> c = build_city(20_000, seed=1)
    >>> len(c.institutions), len(c.cards), c.cards[0].card_id[:4]
    (80, 20000, '3101')
    >>> sorted({i.type for i in c.institutions})
    ['community', 'hospital', 'pharmacy']
    """
    if cards < 1:
        raise ValueError(f"cards must be >= 1, got {cards}")
    rng = _rng(seed, "city")
    n_inst = _n_institutions(cards)
    # minimum per district, the rest by population: 22 % hospitals, 18 % community, 60 % pharmacies
    plan: dict[str, list[str]] = {d.code: ["hospital", "community", "pharmacy", "pharmacy"] for d in DISTRICTS}
    extra = n_inst - 4 * len(DISTRICTS)
    dcum = _cum([d.population_m for d in DISTRICTS])
    for k in range(extra):
        d = DISTRICTS[bisect.bisect_right(dcum, rng.random() * dcum[-1])].code
        # the first extras are level-1 hospitals (一级医院), so every grade exists in a small city
        plan[d].append("hospital1" if k < 4 else _wchoice(rng, ("hospital", "community", "pharmacy"), (22, 18, 60)))
    scale = min(1.5, max(0.34, cards / n_inst / 3000))
    institutions: list[Institution] = []
    physicians: list[Physician] = []
    l3_counter = 0
    for dist in DISTRICTS:
        types = sorted(plan[dist.code], key=("hospital", "hospital1", "community", "pharmacy").index)
        seq = 0
        n_h = n_c = n_p = 0
        for t in types:
            seq += 1
            lat = dist.lat + rng.uniform(-dist.spread_deg, dist.spread_deg)
            lon = dist.lon + rng.uniform(-dist.spread_deg, dist.spread_deg) * 1.15
            if t in ("hospital", "hospital1"):
                n_h += 1
                if t == "hospital1":
                    t, level = "hospital", 1
                elif n_h == 1:
                    level = 3 if (dist.code in _CENTRAL or dist.population_m > 1.5) else 2
                else:
                    level = _wchoice(rng, (3, 2, 1), (20, 40, 40))
                if level == 3:
                    l3_counter += 1
                    if l3_counter <= 10:
                        name = f"上海市第{_CN_NUM[l3_counter - 1]}人民医院"
                    else:
                        name = f"复旦大学附属{dist.short}医院" if l3_counter % 2 else f"上海交通大学医学院附属{dist.short}医院"
                        if any(x.name == name for x in institutions):
                            name = f"{dist.short}区第{l3_counter}人民医院"
                    depts = _L3_DEPTS
                    attr = 4.0
                elif level == 2:
                    name = (f"{dist.short}区中心医院", f"{dist.short}区人民医院", f"{dist.short}区中医医院",
                            f"{dist.short}区第{_CN_NUM[min(n_h, 10) - 1]}人民医院")[min(n_h - 1, 3) if n_h < 4 else 3]
                    if any(x.name == name for x in institutions):
                        name = f"{dist.short}区第{n_h}人民医院"
                    depts = tuple(dd for dd in _L2_DEPTS if dd not in ("皮肤科", "眼科", "肾内科") or rng.random() < 0.6)
                    attr = 2.0
                else:
                    street = _STREETS[(seq * 7 + int(dist.code)) % len(_STREETS)]
                    name = f"{dist.short}区{street}医院"
                    depts = _L1_DEPTS
                    attr = 1.0
                iid = f"H{dist.code}{seq:03d}"
            elif t == "community":
                n_c += 1
                street = _STREETS[(n_c * 11 + int(dist.code) * 3) % len(_STREETS)]
                name = f"{dist.name}{street}街道社区卫生服务中心" if n_c == 1 else f"{dist.name}{street}第{n_c}社区卫生服务中心"
                level, depts, attr, iid = 1, _COMMUNITY_DEPTS, 1.0, f"C{dist.code}{seq:03d}"
            else:
                n_p += 1
                chain = _CHAINS[rng.randrange(len(_CHAINS))]
                name = f"{chain}{dist.short}{n_p}店" if rng.random() < 0.7 else f"{dist.short}大药房{n_p}店"
                level, depts, attr, iid = None, (), (2.0 if n_p == 1 else 1.0), f"P{dist.code}{seq:03d}"
            if rng.random() < 0.03:
                name = _ODD_NAMES[rng.randrange(len(_ODD_NAMES))].format(n=name, s=dist.short)
            inst = Institution(len(institutions), iid, name, t, level, dist.code, tuple(depts),
                               round(lat, 5), round(lon, 5), attr)
            institutions.append(inst)
            # physicians
            pseq = 0
            for dept in depts:
                if t == "community":
                    base = 3 if dept == "全科" else 1
                else:
                    base = {3: 3, 2: 2, 1: 1}[level]
                k = max(1, round(base * scale))
                busy_dept = level == 3 and t == "hospital" and dept in ("心血管内科", "内分泌科", "呼吸内科")
                if busy_dept:
                    k = max(2, k)
                for j in range(k):
                    pseq += 1
                    busy = busy_dept and j == 0 and dept == ("心血管内科", "内分泌科", "呼吸内科")[inst.index % 3]
                    physicians.append(Physician(f"D{iid[1:]}{pseq:03d}", inst.index, dept, busy,
                                                4.0 if busy else rng.uniform(0.7, 1.3)))
    neighbours = {}
    for d in DISTRICTS:
        others = sorted((x.code for x in DISTRICTS if x.code != d.code), key=lambda c: district_distance_km(d.code, c))
        neighbours[d.code] = tuple(others)
    by: dict[tuple[int, str], list[Physician]] = {}
    for p in physicians:
        by.setdefault((p.institution, p.department), []).append(p)
    phys_by = {k: (v, _cum([p.weight for p in v])) for k, v in by.items()}
    city = City(seed=seed, n_cards=cards, districts=DISTRICTS, institutions=institutions, physicians=physicians,
                drugs=DRUGS, cards=CardTable(cards, seed), neighbours=neighbours, phys_by_inst_dept=phys_by)
    if personas:
        _build_personas(city)
    return city


def _build_personas(city: City) -> None:
    """Chronic patients, dialysis patients, multi-specialist elderly and families (look-alikes)."""
    seed = city.seed
    hs = _key(seed, "persona")
    cards = city.cards
    buckets: dict[tuple[str, int], list[int]] = {}
    chronic: dict[int, ChronicPlan] = {}
    dialysis: list[DialysisPlan] = []
    multi: list[int] = []
    for i in range(len(cards)):
        c = cards[i]
        age = c.age
        buckets.setdefault((c.home_district, age // 5), []).append(i)
        if age < 18:
            continue
        h = _mix(hs ^ i)
        h2 = _mix(h)
        u = [((h >> (16 * j)) & 0xFFFF) / 65536.0 for j in range(4)] + \
            [((h2 >> (16 * j)) & 0xFFFF) / 65536.0 for j in range(4)]
        old = age >= 60
        mid = 40 <= age < 60
        if u[7] < (0.0025 if old else 0.0009):            # end-stage renal disease on dialysis
            rng = _rng(seed, "dialysis", i)
            hosp = city.pick_institution(rng, c.home_district, "hospital", 2, dept="肾内科", away_p=0.1)
            dialysis.append(DialysisPlan(i, hosp.index, ((0, 2, 4), (1, 3, 5))[rng.randrange(2)],
                                         rng.choice((11 * 3600, 12 * 3600, 16 * 3600 + 1800, 17 * 3600)) + rng.randrange(1800)))
            continue
        conds = []
        if u[0] < (0.45 if old else 0.18 if mid else 0.03):
            conds.append("htn")
        if u[1] < (0.20 if old else 0.07 if mid else 0.005):
            conds.append("dm")
        if u[2] < (0.14 if old else 0.03 if mid else 0.0):
            conds.append("cad")
        elif u[3] < (0.12 if old else 0.06 if mid else 0.01):
            conds.append("lipid")
        if age >= 25 and u[4] < 0.012:
            conds.append("hbv")
        if u[5] < (0.02 if old else 0.002 if mid else 0.0):
            conds.append("af")
        if not conds:
            continue
        rng = _rng(seed, "chronic", i)
        drugs: list[str] = []
        for cd in conds:
            if cd == "htn":
                drugs.append(rng.choice((AMLODIPINE, VALSARTAN, METOPROLOL, IRBESARTAN)))
            elif cd == "dm":
                if rng.random() < 0.25:
                    drugs.append(INSULIN)
                else:
                    drugs.append(METFORMIN)
                    if rng.random() < 0.4:
                        drugs.append(rng.choice((GLIMEPIRIDE, ACARBOSE)))
            elif cd == "cad":
                drugs.append(STATIN)
                if rng.random() < 0.5:
                    drugs.append(CLOPIDOGREL)
                if rng.random() < 0.3:
                    drugs.append(DANSHEN)
            elif cd == "lipid":
                drugs.append(STATIN)
            elif cd == "hbv":
                drugs.append(ENTECAVIR)
            elif cd == "af":
                drugs.append(RIVAROXABAN)
        drugs = list(dict.fromkeys(drugs))
        long_rx = age >= 55 and rng.random() < 0.12
        interval = rng.choice((56, 60, 84, 90)) if long_rx else rng.choice((28, 28, 30, 30, 30, 29))
        venue_type = _wchoice(rng, ("community", "hospital", "pharmacy"), (50, 30, 20))
        if venue_type == "hospital":
            dept = _CHRONIC_DX[conds[0]][1]
            venue = city.pick_institution(rng, c.home_district, "hospital", 2, dept=dept, away_p=0.15)
        else:
            venue = city.pick_institution(rng, c.home_district, venue_type, away_p=0.05)
        chronic[i] = ChronicPlan(i, tuple(conds), tuple(drugs), interval, rng.randrange(interval), venue.index, long_rx)
        if age >= 65 and len(conds) >= 2 and u[6] < 0.2:
            multi.append(i)
    # families: 2-4 cards of one household (same home district), buying together at one pharmacy
    dialysis_cards = {d.card for d in dialysis}
    used = set(chronic) | dialysis_cards
    fam_members: set[int] = set()
    families = []
    n_fam = max(1, len(cards) // 120) if len(cards) >= 50 else 0
    for f in range(n_fam):
        rng = _rng(seed, "family", f)
        for _ in range(50):
            anchor = cards[rng.randrange(len(cards))]
            if 28 <= anchor.age <= 70 and anchor.index not in fam_members:
                break
        else:
            continue
        members = [anchor.index]
        wanted = rng.choice((1, 1, 2, 2, 3))
        for role in ("spouse", "child", "parent")[:wanted]:
            if role == "spouse":
                band = anchor.age // 5 + rng.choice((-1, 0, 0, 1))
            elif role == "child":
                band = (anchor.age - rng.randint(24, 34)) // 5
            else:
                band = (anchor.age + rng.randint(24, 32)) // 5
            pool = buckets.get((anchor.home_district, band), [])
            for _ in range(20):
                if not pool:
                    break
                j = pool[rng.randrange(len(pool))]
                if j not in fam_members and j not in members and j not in dialysis_cards:
                    members.append(j)
                    break
        if len(members) < 2:
            continue
        fam_members.update(members)
        pharmacy = city.pick_institution(rng, anchor.home_district, "pharmacy", away_p=0.0)
        families.append((tuple(members), pharmacy.index))
    city.chronic = chronic
    city.dialysis = dialysis
    city.multi_specialist = multi
    city.families = families
    city.persona_cards = frozenset(used | fam_members | set(multi))


# ----------------------------------------------------------------------------- the generator

def _fund_share(cat: str | None, itype: str, level: int | None, visit: str) -> float:
    ci = ("employee", "retiree", "resident", "child").index(cat or "resident")
    if visit == "inpatient":
        return (0.85, 0.92, 0.70, 0.75)[ci]
    if visit == "pharmacy" or itype == "pharmacy":
        return (0.55, 0.60, 0.45, 0.45)[ci]
    if itype == "community" or level == 1:
        return (0.75, 0.88, 0.65, 0.65)[ci]
    if level == 2:
        return (0.70, 0.85, 0.55, 0.60)[ci]
    return (0.65, 0.80, 0.50, 0.55)[ci]


class _Fraud:
    __slots__ = ("fraud_id", "rule", "subject_type", "subject_id", "member_ids", "events", "context",
                 "note", "extra")

    def __init__(self, rule: str, subject_type: str, subject_id: str, member_ids: list[str], note: str,
                 **extra: Any):
        self.fraud_id = ""
        self.rule = rule
        self.subject_type = subject_type
        self.subject_id = subject_id
        self.member_ids = member_ids
        self.events: list[dict] = []
        self.context: list[dict] = []
        self.note = note
        self.extra = extra


class _PoolExhausted(Exception):
    pass


class _Gen:
    """Generates one window [start, start + days) of a city: ordinary life, then fraud."""

    TRAVEL_KMH = 25.0

    def __init__(self, city: City, seed: int, start: datetime, days: int, chunk: int, seq_start: int,
                 fraud_scale: float | None = None):
        if start.tzinfo is None:
            raise ValueError("start must be timezone-aware (e.g. +08:00)")
        if days < 1:
            raise ValueError(f"days must be >= 1, got {days}")
        self.city = city
        self.cards = city.cards
        self.seed = seed
        self.start = start
        self.days = days
        self.base = int(start.timestamp())
        self.T = days * 86400
        local0 = self.base + _TZ_S
        self.D0 = local0 // 86400
        self.start_tod = local0 % 86400
        self.D1 = (local0 + self.T - 1) // 86400
        self.chunk = chunk
        self.seq_start = seq_start
        self.rng = _rng(seed, "chunk", self.D0, days, chunk)
        self.out: list[tuple[int, int, dict]] = []
        self.trace_n = 0
        self.trace_base = (self.D0 % 100_000) * 100_000_000
        self.trace_off = _key(seed, "trace") % 10**13
        self.lookalikes: dict[tuple[str, str], dict] = {}
        self.frauds: list[_Fraud] = []
        self._day_prefix: dict[int, tuple[str, str]] = {}
        self.fraud_scale = (city.n_cards / 20000.0) * (days / 7.0) if fraud_scale is None else fraud_scale

    # -- time ---------------------------------------------------------------------------
    def t_abs(self, D: int, tod: int) -> int:
        """Window-relative seconds of local calendar day ``D`` at ``tod`` s after midnight."""
        return D * 86400 + tod - _TZ_S - self.base

    def t_slot(self, d: int, tod: float) -> int:
        """Window-relative seconds for window-day ``d`` at local time-of-day ``tod`` (always in the slot)."""
        return d * 86400 + int((tod - self.start_tod) % 86400)

    def fmt(self, t: int) -> str:
        local = self.base + _TZ_S + t
        D, s = divmod(local, 86400)
        p = self._day_prefix.get(D)
        if p is None:
            ds = date.fromordinal(D + _EPOCH_ORD)
            p = (ds.isoformat() + "T", ds.strftime("%Y%m%d"))
            self._day_prefix[D] = p
        h, r = divmod(s, 3600)
        m, sec = divmod(r, 60)
        return f"{p[0]}{h:02d}:{m:02d}:{sec:02d}+08:00"

    def ymd(self, t: int) -> str:
        self.fmt(t)
        return self._day_prefix[(self.base + _TZ_S + t) // 86400][1]

    # -- items --------------------------------------------------------------------------
    def trace_code(self, drug: Drug) -> str:
        self.trace_n += 1
        return f"{drug.trace_prefix}{_scramble13((self.trace_base + self.trace_n + self.trace_off) % _E13):013d}"

    def drug_line(self, code: str, qty: int, trace_p: float = 0.88) -> dict:
        d = DRUGS[code]
        line = {"code": code, "name": d.name, "category": "drug", "quantity": qty, "unit_price": d.unit_price,
                "amount": round(d.unit_price * qty, 2), "days_supply": d.days_supply * qty}
        if self.rng.random() < trace_p:
            line["trace_codes"] = [self.trace_code(d) for _ in range(qty)]
        return line

    @staticmethod
    def svc_line(code: str, qty: float = 1, price: float | None = None) -> dict:
        name, cat, p = SERVICES[code]
        p = p if price is None else price
        return {"code": code, "name": name, "category": cat, "quantity": qty, "unit_price": p,
                "amount": round(p * qty, 2)}

    def registration(self, inst: Institution, kind: str = "R0001") -> dict:
        if kind == "R0001":
            return self.svc_line("R0001", 1, _REG_PRICE.get((inst.type, inst.level or 1), 20.0))
        return self.svc_line(kind)

    # -- events -------------------------------------------------------------------------
    def emit(self, t: int, card: Card, inst: Institution, visit: str, dept: str | None, phys: str | None,
             dx: Sequence[str] | None, items: list[dict], *, stay: tuple[str, str, str | None] | None = None,
             noise: bool = True) -> dict:
        total = round(sum(it["amount"] for it in items), 2)
        share = _fund_share(card.insured_category, inst.type, inst.level, visit)
        fund = round(total * share, 2)
        ev: dict[str, Any] = {
            "event_id": "", "event_time": "", "card_id": card.card_id, "person_id": card.person_id,
            "birth_year": card.birth_year, "gender": card.gender, "insured_category": card.insured_category,
            "institution_id": inst.institution_id, "institution_name": inst.name,
            "institution_type": inst.type, "institution_level": inst.level, "district": inst.district,
            "department": dept, "physician_id": phys, "visit_type": visit,
        }
        if stay is not None:
            ev["admission_id"], ev["admitted_at"], ev["discharged_at"] = stay
        if dx is not None:
            ev["diagnoses"] = list(dx)
        ev["items"] = items
        ev["total_amount"] = total
        ev["fund_paid"] = fund
        ev["self_paid"] = round(total - fund, 2)
        if noise:
            r = self.rng.random()
            if r < 0.05:
                self._noise(ev, r)
        self.out.append((t, len(self.out), ev))
        return ev

    def _noise(self, ev: dict, r: float) -> None:
        if r < 0.004 and ev["physician_id"] is not None:
            ev["physician_id"] = "未知" if r < 0.002 else "0000"
        elif r < 0.02:
            ev.pop("person_id", None)
        elif r < 0.025:
            for k in ("birth_year", "gender", "insured_category"):
                ev.pop(k, None)
        elif r < 0.03:
            ev.pop("department", None)
        elif r < 0.035 and ev["visit_type"] != "inpatient":
            ev.pop("diagnoses", None)
        elif r < 0.04:
            ev["institution_name"] = None
        elif r < 0.045:
            ev.pop("self_paid", None)
        else:
            it = ev["items"][0]
            it["unit_price"] = None
            it["name"] = None

    def dx_visit(self, t: int, card: Card, inst: Institution, dx: Dx, *, emergency: bool = False,
                 exam_p: float = 0.35, noise: bool = True) -> dict:
        rng = self.rng
        dept = self.city.department(inst, ("儿科",) + dx.depts if card.age < 14 and not emergency else dx.depts)
        phys = self.city.pick_physician(rng, inst, dept)
        if emergency:
            items = [self.svc_line("R0002")]
        else:
            items = [self.registration(inst, "R0003" if inst.level == 3 and rng.random() < 0.2 else "R0001")]
        if inst.type == "community":
            exam_p *= 0.4
        for e in dx.exams:
            if rng.random() < (exam_p * (0.15 if e in ("J0010", "J0011") else 1.0)):
                items.append(self.svc_line(e))
        for tr in dx.treats:
            if rng.random() < 0.5:
                items.append(self.svc_line(tr))
                if tr == "T0001":
                    items.append(self.svc_line("M0001"))
                    items.append(self.drug_line(SALINE, 1, 0.3))
                if tr == "T0002":
                    items.append(self.svc_line("M0003", 2))
        if dx.drugs:
            k = 1 if len(dx.drugs) == 1 or rng.random() < 0.6 else 2
            for code in rng.sample(dx.drugs, k):
                items.append(self.drug_line(code, 1 if rng.random() < 0.7 else 2))
        return self.emit(t, card, inst, "emergency" if emergency else "outpatient", dept, phys, [dx.code], items,
                         noise=noise)

    def pharmacy_visit(self, t: int, card: Card, inst: Institution, codes: Sequence[tuple[str, int]],
                       dx: Sequence[str] | None = None, noise: bool = True) -> dict:
        items = [self.drug_line(c, q) for c, q in codes]
        return self.emit(t, card, inst, "pharmacy", None, None, dx, items, noise=noise)

    def drug_visit(self, t: int, card: Card, inst: Institution, code: str, qty: int, *,
                   dx: str | None = None, noise: bool = False, phys: str | None = None) -> dict:
        """A purchase of ``qty`` packages of one drug: at a pharmacy, or with a registration elsewhere."""
        ddx, ddept = _DRUG_DX.get(code, ("Z76.0", "内科"))
        dx = dx or ddx
        if inst.type == "pharmacy":
            return self.pharmacy_visit(t, card, inst, [(code, qty)], [dx], noise=noise)
        dept = self.city.department(inst, (ddept,))
        phys = phys or self.city.pick_physician(self.rng, inst, dept)
        items = [self.registration(inst), self.drug_line(code, qty, 0.95)]
        return self.emit(t, card, inst, "outpatient", dept, phys, [dx], items, noise=noise)

    # -- travel -------------------------------------------------------------------------
    def travel_s(self, a: Institution, b: Institution) -> int:
        km = _haversine_km(a.lat, a.lon, b.lat, b.lon)
        return int(600 + km / self.TRAVEL_KMH * 3600)

    # =================================================================================
    # ordinary life
    # =================================================================================
    def ordinary(self) -> None:
        city, seed = self.city, self.seed
        intents: dict[tuple[int, int], list[tuple]] = {}
        n = city.n_cards

        def add(card: int, D: int, tod: int, inst: Institution, dur: int, fn: Callable, *args: Any,
                look: tuple | None = None) -> None:
            intents.setdefault((card, D), []).append((tod, inst, dur, fn, args, look))

        days = range(self.D0, self.D1 + 1)
        # --- inpatient stays (look back far enough to see stays still open) ---------------
        blocked: dict[int, list[tuple[int, int]]] = {}
        stays = []
        for D in range(self.D0 - 45, self.D1 + 1):
            rng = _rng(seed, "stay", D)
            k = int(n * 0.0006 + rng.random())
            for j in range(k):
                c = self._weighted_card(rng, lambda a: 0.3 if a < 18 else 0.5 if a < 60 else 2.0)
                cands = [x for x in INPATIENT_DX if x[4] <= c.age <= x[5] and (x[6] is None or x[6] == c.gender)]
                dx = _wchoice(rng, cands, [x[7] for x in cands])
                los = rng.randint(*dx[2])
                if any(not (D + los < a or D > b) for a, b in blocked.get(c.index, ())):
                    continue
                blocked.setdefault(c.index, []).append((D, D + los))
                hosp = city.pick_institution(rng, c.home_district, "hospital", 2, away_p=0.25)
                dept = city.department(hosp, dx[1])
                stays.append((D, j, c, dx, los, hosp, dept, city.pick_physician(rng, hosp, dept), rng.random()))
        for s in stays:
            self._stay_events(*s)
        self.stay_cards = set(blocked)

        def free(card: int, D: int) -> bool:
            for a, b in blocked.get(card, ()):
                if a <= D <= b:
                    return False
            return True

        # --- chronic refills -------------------------------------------------------------
        for i, p in city.chronic.items():
            c0 = (self.D0 - 3 - p.phase) // p.interval_days
            c1 = (self.D1 + 3 - p.phase) // p.interval_days
            for cyc in range(c0, c1 + 1):
                h = _mix(_key(seed, "refill", i) ^ (cyc & _M64))
                D = p.phase + cyc * p.interval_days + (h % 6) - 3      # refills up to 3 days early
                if self.D0 <= D <= self.D1 and free(i, D):
                    inst = city.institutions[p.venue]
                    prof = _C_PHARMACY if inst.type == "pharmacy" else _C_COMMUNITY if inst.type == "community" else _C_OUTPATIENT
                    tod = _tod(random.Random(h), prof)
                    look = (("chronic_long_rx", self.cards[i].card_id,
                             {"note": f"approved {p.interval_days}-day prescription"}) if p.long_rx else None)
                    add(i, D, tod, inst, 2400, self._chronic_visit, p, cyc, look=look)
        # --- dialysis --------------------------------------------------------------------
        for dp in city.dialysis:
            for D in days:
                wd = (D + 3) % 7          # 1970-01-01 was a Thursday
                if wd in dp.weekdays and free(dp.card, D):
                    add(dp.card, D, dp.end_tod, city.institutions[dp.hospital], 1800, self._dialysis_visit, wd,
                        look=("dialysis", self.cards[dp.card].card_id, {"note": "haemodialysis 3x/week, N18.5"}))
        # --- multi-specialist elderly (3-4 institutions in one week) ----------------------
        for W in range((self.D0 + 3) // 7, (self.D1 + 3) // 7 + 1):
            rng = _rng(seed, "multi", W)
            for i in city.multi_specialist:
                # at most one busy week in each 4-week block: 3-4 specialists, never 15 visits a month
                if (W + _mix(_key(seed, "multiw", i)) % 4) % 4 != 0 or rng.random() >= 0.6:
                    continue
                c = self.cards[i]
                plan = city.chronic.get(i)
                k = rng.randint(3, 4)
                wdays = sorted(rng.sample(range(5), k))
                depts = ["心血管内科", "内分泌科", "眼科", "骨科", "神经内科"]
                rng.shuffle(depts)
                seen: set[int] = set()
                for wd, dept in zip(wdays, depts):
                    D = W * 7 - 3 + wd
                    for _ in range(8):
                        inst = city.pick_institution(rng, c.home_district, "hospital", 2, dept=dept, away_p=0.4)
                        if inst.index not in seen:
                            break
                    seen.add(inst.index)
                    tod = _tod(rng, _C_OUTPATIENT)
                    if self.D0 <= D <= self.D1 and free(i, D):
                        add(i, D, tod, inst, 5400, self._specialist_visit, dept, plan,
                            look=("multi_specialist", c.card_id, {"note": "elderly patient seeing several specialists"}))
        # --- families buying together ----------------------------------------------------
        for D in days:
            rng = _rng(seed, "family", D)
            for f, (members, pharm) in enumerate(city.families):
                if rng.random() >= 1 / 18:
                    continue
                tod = _tod(rng, _C_PHARMACY)
                same = rng.choice((OMEPRAZOLE, LIANHUA, LORATADINE, IBUPROFEN, AMBROXOL)) if rng.random() < 0.5 else None
                inst = city.institutions[pharm]
                present = [m for m in members if free(m, D)]
                if len(present) < 2:
                    continue
                look = ("family", f"FAM{f:06d}", {"member_ids": [self.cards[m].card_id for m in members],
                                                  "note": f"{len(members)} cards of one household at one pharmacy"})
                for m in present:
                    add(m, D, tod + rng.randrange(240), inst, 900, self._otc_visit, same, look=look)
        # --- background visits -----------------------------------------------------------
        dow = (1.15, 1.05, 1.05, 1.05, 1.05, 0.8, 0.65)
        for D in days:
            rng = _rng(seed, "bg", D)
            k = int(n * 0.026 * dow[(D + 3) % 7] + rng.random())
            today: set[int] = set()
            for _ in range(k):
                c = self._weighted_card(rng, lambda a: 0.7 if a < 18 else 0.55 if a < 60 else 1.3 if a < 75 else 1.6)
                if c.index in today or not free(c.index, D):
                    continue
                today.add(c.index)
                kind = _wchoice(rng, ("community", "hospital", "emergency", "pharmacy"), (28, 34, 5, 33))
                if kind == "community":
                    inst = city.pick_institution(rng, c.home_district, "community")
                    dx = _pick_dx(rng, CHILD_DX if c.age < 14 else ADULT_DX, c.age)
                    tod = _tod(rng, _C_COMMUNITY)
                    add(c.index, D, tod, inst, 2400, self._dx_intent, dx, False)
                    if rng.random() < 0.12 and tod < 14 * 3600:       # same-day referral to a hospital
                        hosp = city.pick_institution(rng, c.home_district, "hospital", 2, away_p=0.3)
                        add(c.index, D, tod + rng.randint(2 * 3600, 4 * 3600), hosp, 5400, self._dx_intent, dx, False,
                            look=("referral", c.card_id, {"note": "community centre then hospital the same day"}))
                elif kind == "hospital":
                    inst = city.pick_institution(rng, c.home_district, "hospital")
                    dx = _pick_dx(rng, CHILD_DX if c.age < 14 else ADULT_DX, c.age)
                    add(c.index, D, _tod(rng, _C_OUTPATIENT), inst, 5400, self._dx_intent, dx, False)
                elif kind == "emergency":
                    inst = city.pick_institution(rng, c.home_district, "hospital", 2, dept="急诊科", away_p=0.1)
                    dx = _pick_dx(rng, EMERGENCY_DX, c.age)
                    add(c.index, D, _tod(rng, _C_EMERGENCY), inst, 7200, self._dx_intent, dx, True)
                else:
                    inst = city.pick_institution(rng, c.home_district, "pharmacy", away_p=0.15)
                    add(c.index, D, _tod(rng, _C_PHARMACY), inst, 900, self._otc_visit, None)
        # --- schedule each card's day as one trip ---------------------------------------
        for (ci, D), lst in sorted(intents.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            if len(lst) > 4:      # persona visits first, then background ones: at most 4 a day
                lst = lst[:4]
            lst.sort(key=lambda x: x[0])
            card = self.cards[ci]
            t_prev = None
            prev = None
            for tod, inst, dur, fn, args, look in lst:
                t = self.t_abs(D, tod)
                if prev is not None:
                    t = max(t, t_prev + prev[1] + self.travel_s(prev[0], inst))
                if 0 <= t < self.T:
                    fn(t, card, inst, *args)
                    if look is not None:
                        self.lookalike(look[0], look[1], **look[2])
                t_prev, prev = t, (inst, dur)
        # busy physicians who worked in this window
        busy = {p.physician_id for p in city.physicians if p.busy}
        for _, _, ev in self.out:
            if ev.get("physician_id") in busy:
                self.lookalike("busy_physician", ev["physician_id"], note="level-3 physician with steadily high volume")

    def _weighted_card(self, rng: random.Random, wfn: Callable[[int], float], wmax: float = 2.0) -> Card:
        n = self.city.n_cards
        while True:
            c = self.cards[rng.randrange(n)]
            if rng.random() * wmax < wfn(c.age):
                return c

    def lookalike(self, kind: str, subject: str, **kw: Any) -> None:
        if (kind, subject) not in self.lookalikes:
            self.lookalikes[(kind, subject)] = {"kind": kind, "subject_id": subject, **kw}

    # ordinary visit builders: fn(t, card, inst, *args)
    def _dx_intent(self, t: int, card: Card, inst: Institution, dx: Dx, emergency: bool) -> None:
        self.dx_visit(t, card, inst, dx, emergency=emergency)

    def _otc_visit(self, t: int, card: Card, inst: Institution, same: str | None) -> None:
        rng = self.rng
        pool = [c for c, d in DRUGS.items() if d.otc and (d.child_ok or card.age >= 14)]
        if same is not None and (DRUGS[same].child_ok or card.age >= 14):
            codes = [(same, 1)]
        else:
            codes = [(rng.choice(pool), rng.choice((1, 1, 2)))]
            if rng.random() < 0.3:
                other = rng.choice(pool)
                if other != codes[0][0]:
                    codes.append((other, 1))
        self.pharmacy_visit(t, card, inst, codes)

    def _chronic_visit(self, t: int, card: Card, inst: Institution, p: ChronicPlan, cyc: int) -> None:
        rng = self.rng
        dxs = [_CHRONIC_DX[c][0] for c in p.conditions]
        lines = [self.drug_line(code, math.ceil(p.interval_days / DRUGS[code].days_supply), 0.92) for code in p.drugs]
        if inst.type == "pharmacy":
            self.emit(t, card, inst, "pharmacy", None, None, dxs, lines)
            return
        dept = self.city.department(inst, (_CHRONIC_DX[p.conditions[0]][1],))
        items = [self.registration(inst)]
        if cyc % 3 == 0:
            for cond in p.conditions:
                items.append(self.svc_line({"htn": "J0007", "dm": "J0006", "cad": "J0012", "lipid": "J0012",
                                            "hbv": "J0014", "af": "J0007"}[cond]))
        items.extend(lines)
        self.emit(t, card, inst, "outpatient", dept, self.city.pick_physician(rng, inst, dept), dxs, items)

    def _dialysis_visit(self, t: int, card: Card, inst: Institution, wd: int) -> None:
        items = [self.svc_line("T0101"), self.svc_line("M0002"), self.drug_line(HEPARIN, 1, 0.5)]
        if wd in (0, 1):
            items.append(self.drug_line(EPO, 2, 0.9))
        dept = self.city.department(inst, ("肾内科",))
        self.emit(t, card, inst, "outpatient", dept, self.city.pick_physician(self.rng, inst, dept), ["N18.5"], items)

    def _specialist_visit(self, t: int, card: Card, inst: Institution, dept: str, plan: ChronicPlan | None) -> None:
        rng = self.rng
        dx, exams, drugs = {
            "心血管内科": ("I10", ("J0007", "J0009", "J0012"), (AMLODIPINE, NITRO)),
            "内分泌科": ("E11.9", ("J0005", "J0006"), (METFORMIN, ACARBOSE)),
            "眼科": ("H36.0", ("J0015",), (LEVO_DROPS,)),
            "骨科": ("M17.9", ("J0008",), (DICLOFENAC,)),
            "神经内科": ("I67.9", ("J0010", "J0009"), ()),
        }[dept]
        d = self.city.department(inst, (dept,))
        items = [self.registration(inst, "R0003" if inst.level == 3 and rng.random() < 0.5 else "R0001")]
        for e in rng.sample(exams, rng.randint(1, len(exams))):
            items.append(self.svc_line(e))
        if drugs and rng.random() < 0.6:
            items.append(self.drug_line(rng.choice(drugs), 1))
        self.emit(t, card, inst, "outpatient", d, self.city.pick_physician(rng, inst, d), [dx], items)

    def _stay_events(self, D: int, j: int, c: Card, dx: tuple, los: int, hosp: Institution, dept: str,
                     phys: str, u: float, *, fraud: _Fraud | None = None, tod_admit: int | None = None) -> list[dict]:
        """Admission bill, interim bills every 3-4 days and the discharge bill of one stay."""
        rng = _rng(self.seed, "staybill", D, j)
        if tod_admit is None:
            tod_admit = _tod(rng, _C_EMERGENCY) if u < 0.3 else rng.randint(8 * 3600, 16 * 3600)
        t_adm = self.t_abs(D, tod_admit) if fraud is None else self.t_slot(D, tod_admit)
        t_dis = t_adm + (los * 86400 - tod_admit + rng.randint(9 * 3600, 11 * 3600 + 1800))
        aid = f"A{date.fromordinal(D + _EPOCH_ORD).strftime('%Y%m%d') if fraud is None else self.ymd(t_adm)}{j:05d}"
        admitted_at = self.fmt(t_adm)
        bed = _BED_PRICE[hosp.level or 2]
        bills: list[tuple[int, list[dict], bool]] = []
        first = [self.svc_line(e) for e in ("J0001", "J0003", "J0004", "J0007", "J0008")]
        first.append(self.svc_line("B0001", 1, bed))
        bills.append((t_adm + rng.randint(3600, 3 * 3600), first, False))
        day = 1
        t_last = t_adm
        while day + 3 < los:
            step = rng.randint(3, 4)
            t_b = t_adm + (step + day - 1) * 86400 + rng.randint(-3600, 3600) + (10 * 3600 - tod_admit)
            if t_b >= t_dis - 86400:
                break
            items = [self.svc_line("B0001", step, bed), self.svc_line("T0005", step), self.svc_line("O0001", step),
                     self.drug_line(CEFTRIAXONE if dx[0] in ("J18.9", "K35.8", "K80.2") else SALINE, step * 2, 0.6),
                     self.svc_line("T0001", step)]
            bills.append((t_b, items, False))
            day += step
            t_last = t_b
        rest = max(1, los - day)
        final = [self.svc_line("B0001", rest, bed), self.svc_line("T0005", rest), self.svc_line("O0001", rest)]
        for code in dx[3]:
            final.append(self.svc_line(code))
        final.append(self.drug_line(SALINE, rest * 2, 0.6))
        bills.append((max(t_dis, t_last + 3600), final, True))
        out = []
        for t, items, last in bills:
            if 0 <= t < self.T:
                stay = (aid, admitted_at, self.fmt(t) if last else None)
                out.append(self.emit(t, c, hosp, "inpatient", dept, phys, [dx[0]], items, stay=stay,
                                     noise=fraud is None))
        return out

    # =================================================================================
    # fraud
    # =================================================================================
    def inject_fraud(self) -> None:
        used = {self._card_index[ev["card_id"]] for _, _, ev in self.out}
        self.avoid = used | set(self.city.persona_cards) | self.stay_cards
        self.frng = _rng(self.seed, "fraud", self.D0, self.days, self.chunk)
        s = self.fraud_scale

        def count(base: float, minimum: int = 1) -> int:
            return max(minimum, int(round(base * s)))

        plan: list[tuple[Callable, tuple]] = []
        n_hop = count(4, 2)
        for k in range(n_hop):
            plan.append((self.f_card_hopping, ("week" if k % 2 and self.days >= 3 else "day",)))
        plan += [(self.f_overdispensing, ())] * count(4)
        n_sc = count(6, 3)
        plan += [(self.f_shared_card, ("abc"[k % 3],)) for k in range(n_sc)]
        plan += [(self.f_card_ring, ())] * count(3)
        plan += [(self.f_visit_frequency, ("A" if k % 2 == 0 or self.days < 6 else "B",)) for k in range(count(4))]
        plan += [(self.f_cost_anomaly, ())] * count(4)
        plan += [(self.f_duplicate_billing, ())] * count(4)
        plan += [(self.f_trace_code_reuse, ())] * count(4)
        for fn, args in plan:
            try:
                fn(*args)
            except _PoolExhausted:
                pass
        try:
            for _ in range(count(3)):
                self.f_prescriber_volume()
        except _PoolExhausted:
            pass

    @property
    def _card_index(self) -> dict[str, int]:
        ci = getattr(self, "_ci", None)
        if ci is None:
            ci = {c.card_id: i for i, c in self.cards._cache.items()}
            self._ci = ci
        return ci

    def fcard(self, pred: Callable[[Card], bool] = lambda c: 18 <= c.age <= 75) -> Card:
        """A card with no ordinary activity in this window and not a look-alike persona."""
        n = self.city.n_cards
        for _ in range(4000):
            i = self.frng.randrange(n)
            if i in self.avoid:
                continue
            c = self.cards[i]
            if pred(c):
                self.avoid.add(i)
                return c
        raise _PoolExhausted

    def new_fraud(self, rule: str, subject_type: str, subject_id: str, members: list[str], note: str,
                  **extra: Any) -> _Fraud:
        f = _Fraud(rule, subject_type, subject_id, members, note, **extra)
        self.frauds.append(f)
        return f

    def route(self, home: str, n: int, types: tuple[str, ...] = ("pharmacy", "hospital"),
              exclude: set[int] | None = None) -> list[Institution]:
        """``n`` distinct institutions along a nearest-neighbour walk through districts from ``home``."""
        rng = self.frng
        out: list[Institution] = []
        cur, seen = home, {home}
        while len(out) < n:
            here = [i for i in self.city.institutions
                    if i.district == cur and i.type in types and (exclude is None or i.index not in exclude)]
            rng.shuffle(here)
            out.extend(here)
            rest = [d for d in self.city.neighbours[cur] if d not in seen]
            if not rest:
                break
            cur = rest[0] if rng.random() < 0.75 or len(rest) == 1 else rest[1]
            seen.add(cur)
        if len(out) < n:
            raise _PoolExhausted
        return out[:n]

    def timeline(self, d: int, insts: list[Institution], tod0: float, span_s: float, min_gap: int = 900) -> list[int]:
        """Window-relative times visiting ``insts`` in order on window-day ``d``, travel-feasible."""
        rng = self.frng
        n = len(insts)
        gap = span_s / max(1, n - 1)
        out, tod = [], tod0
        for k, inst in enumerate(insts):
            if k:
                need = max(min_gap, int(600 + _haversine_km(insts[k - 1].lat, insts[k - 1].lon, inst.lat, inst.lon) / 30 * 3600))
                tod += max(need, gap * rng.uniform(0.75, 1.25))
            out.append(self.t_slot(d, min(tod, 86399 - (n - k) * 60)))
        return out

    def resale_drug(self, exclude: Sequence[str] = ()) -> str:
        return self.frng.choice([c for c in RESALE_PRONE if c not in exclude])

    # -- card_hopping ---------------------------------------------------------------------
    def f_card_hopping(self, kind: str) -> None:
        rng = self.frng
        card = self.fcard(lambda c: 22 <= c.age <= 70)
        drug = self.resale_drug()
        if kind == "day":
            d = rng.randrange(self.days)
            n = rng.randint(12, 20)
            insts = self.route(card.home_district, n)
            times = self.timeline(d, insts, rng.uniform(7.5, 9.5) * 3600, rng.uniform(8, 14) * 3600)
            f = self.new_fraud("card_hopping", "card", card.card_id, [card.card_id],
                               f"{n} institutions in one day buying {DRUGS[drug].name}", kind="24h",
                               also_rules=["overdispensing"])
            for t, inst in zip(times, insts):
                code = drug if rng.random() < 0.75 else self.resale_drug()
                f.events.append(self.drug_visit(t, card, inst, code, rng.randint(2, 5) if inst.type == "pharmacy" else rng.randint(1, 3)))
            return
        k = min(7, self.days)
        total = rng.randint(25, 32)
        per = [total // k + (1 if j < total % k else 0) for j in range(k)]
        if max(per) > 11:
            raise _PoolExhausted
        d0 = rng.randrange(self.days - k + 1)
        insts = self.route(card.home_district, total)
        f = self.new_fraud("card_hopping", "card", card.card_id, [card.card_id],
                           f"{total} institutions in {k} days (at most {max(per)} a day)", kind="7d",
                           also_rules=["visit_frequency", "overdispensing"])
        pos = 0
        for j, m in enumerate(per):
            day_insts = insts[pos:pos + m]
            pos += m
            times = self.timeline(d0 + j, day_insts, rng.uniform(8, 10) * 3600, rng.uniform(5, 9) * 3600)
            for t, inst in zip(times, day_insts):
                code = drug if rng.random() < 0.7 else self.resale_drug()
                f.events.append(self.drug_visit(t, card, inst, code, rng.randint(1, 4)))

    # -- overdispensing -------------------------------------------------------------------
    def f_overdispensing(self) -> None:
        rng = self.frng
        card = self.fcard(lambda c: 35 <= c.age <= 85)
        drug = self.resale_drug()
        n_inst = rng.randint(3, 5)
        insts = self.route(card.home_district, n_inst, ("pharmacy", "hospital", "community"))
        # purchase days every 2-5 days (several per day when the window is short)
        purchases: list[tuple[int, int]] = []
        if self.days >= 6:
            d = rng.randrange(0, 2)
            while d < self.days:
                purchases.append((d, rng.randint(9, 16) * 3600))
                d += rng.randint(2, 4)
        else:
            for d in range(self.days):
                for h in sorted(rng.sample(range(9, 18, 3), 2 if self.days > 1 else 3)):
                    purchases.append((d, h * 3600))
        if len(purchases) < 3:
            purchases.append((self.days - 1, 19 * 3600))
        supply = 0
        f = self.new_fraud("overdispensing", "card", card.card_id, [card.card_id], "", drug=drug)
        for k, (d, tod) in enumerate(purchases):
            inst = insts[k % n_inst]
            qty = rng.randint(1, 3)
            supply += qty * DRUGS[drug].days_supply
            f.events.append(self.drug_visit(self.t_slot(d, tod + rng.randrange(1800)), card, inst, drug, qty))
        span = purchases[-1][0] - purchases[0][0] + 1
        f.note = f"{supply} days of {DRUGS[drug].name} in {span} days at {min(n_inst, len(purchases))} institutions"

    # -- shared_card ----------------------------------------------------------------------
    def f_shared_card(self, kind: str) -> None:
        rng, city = self.frng, self.city
        if kind == "a":
            card = self.fcard(lambda c: 20 <= c.age <= 70)
            f = self.new_fraud("shared_card", "card", card.card_id, [card.card_id], "", kind="impossible_travel")
            notes = []
            for d in sorted(rng.sample(range(self.days), min(self.days, rng.randint(1, 2)))):
                far = [(a.code, b.code) for a in DISTRICTS for b in DISTRICTS
                       if a.code < b.code and district_distance_km(a.code, b.code) >= 50]
                pair = far[rng.randrange(len(far))]
                da, db = pair if rng.random() < 0.5 else pair[::-1]
                ia = city.pick_institution(rng, da, "hospital", away_p=0.0)
                ib = city.pick_institution(rng, db, "pharmacy", away_p=0.0)
                t1 = self.t_slot(d, rng.randint(9 * 3600, 15 * 3600))
                t2 = t1 + rng.randint(20 * 60, 40 * 60)
                f.events.append(self.dx_visit(t1, card, ia, _pick_dx(rng, ADULT_DX, card.age), noise=False))
                f.events.append(self.drug_visit(t2, card, ib, self.resale_drug(), rng.randint(1, 3)))
                km = district_distance_km(da, db)
                notes.append(f"{da}->{db} {km:.0f} km in {(t2 - t1) // 60} min")
            f.note = "impossible travel: " + "; ".join(notes)
        elif kind == "b":
            card = self.fcard(lambda c: 45 <= c.age <= 85)
            hosp = city.pick_institution(rng, card.home_district, "hospital", 2, away_p=0.0)
            d0 = rng.randrange(max(1, self.days - 3))
            los = rng.randint(4, 9)
            cands = [x for x in INPATIENT_DX if x[4] <= card.age <= x[5] and (x[6] is None or x[6] == card.gender)
                     and x[0] != "O80"]
            dx = cands[rng.randrange(len(cands))]
            dept = city.department(hosp, dx[1])
            f = self.new_fraud("shared_card", "card", card.card_id, [card.card_id], "", kind="inpatient_overlap",
                               institution_id=hosp.institution_id)
            tod_admit = rng.randint(8 * 3600, 11 * 3600)
            f.context = self._stay_events(d0, 90000 + len(self.frauds), card, dx, los, hosp, dept,
                                          city.pick_physician(rng, hosp, dept), 1.0, fraud=f, tod_admit=tod_admit)
            admission_t = min(self.t_slot(d0, tod_admit) + 3 * 3600, self.T)
            days_in = [d for d in range(d0 + 1, min(d0 + los - 1, self.days))] or [d0]
            for d in sorted(rng.sample(days_in, min(len(days_in), rng.randint(1, 3)))):
                tod = rng.randint(15 * 3600, 19 * 3600)
                t = self.t_slot(d, tod)
                if t <= admission_t + 3600:
                    t = admission_t + 3600 + rng.randrange(3600)
                inst = city.pick_institution(rng, card.home_district, rng.choice(("pharmacy", "community")), away_p=0.3)
                if inst.type == "pharmacy":
                    f.events.append(self.drug_visit(t, card, inst, self.resale_drug(), rng.randint(1, 3)))
                else:
                    f.events.append(self.dx_visit(t, card, inst, _pick_dx(rng, ADULT_DX, card.age), noise=False))
            f.note = f"{len(f.events)} settlements elsewhere while in hospital at {hosp.institution_id}"
        else:
            card = self.fcard(lambda c: 3 <= c.age <= 12 and c.insured_category == "child")
            f = self.new_fraud("shared_card", "card", card.card_id, [card.card_id], "", kind="child_adult_drug")
            names = []
            for d in sorted(rng.sample(range(self.days), min(self.days, rng.randint(1, 3)))):
                drug = rng.choice((INSULIN, STATIN, CLOPIDOGREL))
                inst = city.pick_institution(rng, card.home_district, "pharmacy", away_p=0.3)
                f.events.append(self.drug_visit(self.t_slot(d, rng.randint(9 * 3600, 20 * 3600)), card, inst, drug,
                                                rng.randint(1, 3)))
                names.append(DRUGS[drug].name)
            f.note = f"child card (born {card.birth_year}) bought {', '.join(names)}"

    # -- card_ring ------------------------------------------------------------------------
    def f_card_ring(self) -> None:
        rng, city = self.frng, self.city
        g = rng.randint(8, 14)
        members = [self.fcard(lambda c: 50 <= c.age <= 88) for _ in range(g)]
        pharm = city.pick_institution(rng, members[0].home_district, "pharmacy", away_p=0.5)
        drug = self.resale_drug()
        k = min(self.days, rng.randint(2, 3))
        f = self.new_fraud("card_ring", "ring", f"RING-{pharm.institution_id}-{drug}", [m.card_id for m in members],
                           "", institution_id=pharm.institution_id, drug=drug, also_rules=["overdispensing"])
        for j, d in enumerate(sorted(rng.sample(range(self.days), k))):
            present = members if g <= 9 or j == 0 else rng.sample(members, max(8, g - rng.randint(0, 2)))
            t0 = self.t_slot(d, rng.randint(9 * 3600, 16 * 3600))
            span = rng.randint(20 * 60, 55 * 60)
            offs = sorted(rng.randrange(span) for _ in present)
            for m, o in zip(present, offs):
                f.events.append(self.drug_visit(t0 + o, m, pharm, drug, rng.randint(2, 4)))
        f.note = f"{g} cards buying {DRUGS[drug].name} at {pharm.institution_id} within an hour on {k} day(s)"

    # -- prescriber_volume ----------------------------------------------------------------
    def f_prescriber_volume(self) -> None:
        rng, city = self.frng, self.city
        if self.days >= 5:
            spike0 = rng.randint(max(2, self.days // 2), self.days - 2)
        else:
            spike0 = self.days // 2
        spike = list(range(spike0, min(self.days, spike0 + rng.randint(2, 3))))
        taken = {f.subject_id for f in self.frauds if f.rule == "prescriber_volume"}
        counts: dict[str, list[int]] | None = getattr(self, "_phys_counts", None)
        if counts is None:
            counts = {}
            fraud_ev = {id(e) for f in self.frauds for e in f.events}
            for t, _, ev in self.out:
                p = ev.get("physician_id")
                if p and p[0] == "D" and id(ev) not in fraud_ev and 0 <= t < self.T:
                    counts.setdefault(p, [0] * self.days)[t // 86400] += 1
            self._phys_counts = counts
        busy = {p.physician_id for p in city.physicians if p.busy}
        by_id = {p.physician_id: p for p in city.physicians}
        cands = []
        for pid, cs in counts.items():
            base = [c for j, c in enumerate(cs) if j not in spike] or cs
            mean = sum(base) / len(base)
            if pid not in busy and pid not in taken and mean >= 1.5:
                cands.append((pid, mean))
        if not cands:
            raise _PoolExhausted
        cands.sort()
        pid, mean = cands[rng.randrange(len(cands))]
        phys = by_id[pid]
        inst = city.institutions[phys.institution]
        factor = rng.uniform(3.5, 6.0)
        f = self.new_fraud("prescriber_volume", "physician", pid, [], "", institution_id=inst.institution_id,
                           baseline_per_day=round(mean, 2))
        k = 0
        for d in spike:
            extra = max(4, int(round(mean * factor)) - counts[pid][d])
            for _ in range(extra):
                k += 1
                card = self.fcard(lambda c: 30 <= c.age <= 85)
                f.member_ids.append(card.card_id)
                t = self.t_slot(d, rng.randint(8 * 3600, 17 * 3600))
                code = self.resale_drug() if k % 5 else rng.choice((AMLODIPINE, METFORMIN))     # 80 % resale-prone
                dx, _ = _DRUG_DX.get(code, ("I10", ""))
                items = [self.registration(inst, "R0003" if inst.level == 3 else "R0001"),
                         self.drug_line(code, rng.randint(2, 4), 0.95)]
                if rng.random() < 0.3:
                    items.insert(1, self.svc_line(rng.choice(("J0012", "J0006", "J0007"))))
                f.events.append(self.emit(t, card, inst, "outpatient", phys.department, pid, [dx], items, noise=False))
        f.note = (f"{pid} at {inst.institution_id}: about {factor:.1f}x the baseline of {mean:.1f} settlements a day "
                  f"on {len(spike)} day(s), mostly resale-prone drugs")

    # -- visit_frequency ------------------------------------------------------------------
    def f_visit_frequency(self, kind: str) -> None:
        rng, city = self.frng, self.city
        card = self.fcard(lambda c: 45 <= c.age <= 85)
        pool = self.route(card.home_district, rng.randint(6, 9), ("community", "hospital"))
        pool = [i for i in pool if i.type == "community" or (i.level or 1) <= 2] or pool
        if len(pool) < 4:
            pool = self.route(card.home_district, 8, ("community", "hospital"))
        f = self.new_fraud("visit_frequency", "card", card.card_id, [card.card_id], "", kind=kind)
        dxs = [d for d in ADULT_DX if d.code in ("I10", "M54.5", "K29.7", "M17.9", "J06.9")]
        if kind == "A":
            n_days = min(self.days, rng.randint(3, 4))
            for d in sorted(rng.sample(range(self.days), n_days)):
                v = rng.randint(5, 6)
                insts = rng.sample(pool, min(len(pool), rng.randint(4, 5)))
                seq = insts + [insts[rng.randrange(len(insts))] for _ in range(v - len(insts))]
                seq.sort(key=lambda i: (i.lat, i.lon))
                times = self.timeline(d, seq, rng.uniform(7.5, 8.5) * 3600, rng.uniform(7.5, 9) * 3600, 2700)
                for t, inst in zip(times, seq):
                    f.events.append(self.dx_visit(t, card, inst, dxs[rng.randrange(len(dxs))], exam_p=0.1, noise=False))
            f.note = f"5-6 visits at 4-5 institutions a day on {n_days} day(s)"
        else:
            w = min(self.days, 30)
            v = rng.randint(15, 18)
            home = pool[: rng.randint(1, 3)]
            slots = sorted(rng.sample([(d, s) for d in range(w) for s in range(3)], v))
            for d, s in slots:
                t = self.t_slot(d, (8 + 3 * s) * 3600 + rng.randrange(5400))
                f.events.append(self.dx_visit(t, card, home[rng.randrange(len(home))], dxs[rng.randrange(len(dxs))],
                                              exam_p=0.05, noise=False))
            f.note = f"{v} outpatient visits in {w} days"

    # -- cost_anomaly ---------------------------------------------------------------------
    def f_cost_anomaly(self) -> None:
        rng, city = self.frng, self.city
        card = self.fcard(lambda c: 25 <= c.age <= 44 and c.insured_category == "employee")
        dx = [d for d in ADULT_DX if d.code in ("J06.9", "K29.7", "M54.5")][rng.randrange(3)]
        hosps = [city.pick_institution(rng, card.home_district, "hospital", 2, away_p=0.2) for _ in range(2)]
        target = rng.uniform(5500, 9000)
        total = 0.0
        f = self.new_fraud("cost_anomaly", "card", card.card_id, [card.card_id], "", diagnosis=dx.code)
        n_visits = rng.randint(3, 5)
        w = min(self.days, 30)
        ds = sorted(rng.sample(range(w), n_visits) if w >= n_visits else [rng.randrange(w) for _ in range(n_visits)])
        for k, d in enumerate(ds):
            inst = hosps[k % 2]
            dept = city.department(inst, dx.depts)
            items = [self.registration(inst, "R0003" if inst.level == 3 else "R0001"),
                     self.svc_line(rng.choice(("J0011", "J0010")))]
            left = (target - total) / (n_visits - k)
            while sum(i["amount"] for i in items) < left:
                items.append(self.drug_line(rng.choice((ALBUMIN, THYMALFASIN, NGF)), rng.randint(1, 3), 0.7))
            t = self.t_slot(d, (8 + 2 * k) * 3600 + rng.randrange(3600))
            ev = self.emit(t, card, inst, "outpatient", dept, city.pick_physician(rng, inst, dept), [dx.code], items,
                           noise=False)
            total += ev["total_amount"]
            f.events.append(ev)
        f.note = (f"outpatient cost ¥{total:,.0f} in {ds[-1] - ds[0] + 1} day(s) for {dx.code}; "
                  f"peers (employee, 25-44) spend about ¥100-300 a visit")

    # -- duplicate_billing ----------------------------------------------------------------
    def f_duplicate_billing(self) -> None:
        rng, city = self.frng, self.city
        card0 = self.fcard()
        itype = _wchoice(rng, ("hospital", "community", "pharmacy"), (40, 35, 25))
        inst = city.pick_institution(rng, card0.home_district, itype, away_p=0.0)
        f = self.new_fraud("duplicate_billing", "institution", inst.institution_id, [], "",
                           also_rules=["trace_code_reuse"])
        for k in range(rng.randint(1, 2)):
            card = card0 if k == 0 else self.fcard()
            f.member_ids.append(card.card_id)
            t = self.t_slot(rng.randrange(self.days), rng.randint(9 * 3600, 17 * 3600))
            if inst.type == "pharmacy":
                ev = self.pharmacy_visit(t, card, inst, [(rng.choice((AMLODIPINE, METFORMIN, OMEPRAZOLE)), 2)],
                                         noise=False)
            else:
                ev = self.dx_visit(t, card, inst, _pick_dx(rng, ADULT_DX, card.age), exam_p=0.6, noise=False)
            dup = orjson.loads(orjson.dumps(ev))
            self.out.append((t + rng.randint(60, 300), len(self.out), dup))
            f.events += [ev, dup]
        f.note = f"{len(f.events) // 2} bill(s) settled twice within 5 minutes at {inst.institution_id}"

    # -- trace_code_reuse -----------------------------------------------------------------
    def f_trace_code_reuse(self) -> None:
        rng, city = self.frng, self.city
        a = self.fcard(lambda c: 40 <= c.age <= 85)
        b = self.fcard(lambda c: 30 <= c.age <= 85)
        drug = self.resale_drug()
        x = city.pick_institution(rng, a.home_district, rng.choice(("hospital", "pharmacy")), away_p=0.1)
        for _ in range(10):
            y = city.pick_institution(rng, b.home_district, "pharmacy", away_p=0.3)
            if y.index != x.index:
                break
        d1 = rng.randrange(max(1, self.days - 2))
        t1 = self.t_slot(d1, rng.randint(9 * 3600, 12 * 3600))
        if self.days - 1 > d1:
            d2 = min(self.days - 1, d1 + rng.randint(2, 5))
            t2 = self.t_slot(d2, rng.randint(9 * 3600, 20 * 3600))
        else:
            t2 = t1 + rng.randint(3 * 3600, 8 * 3600)
        qty = rng.randint(2, 4)
        first = self.drug_visit(t1, a, x, drug, qty)
        line = next(i for i in first["items"] if i["category"] == "drug")
        if "trace_codes" not in line:
            line["trace_codes"] = [self.trace_code(DRUGS[drug]) for _ in range(qty)]
        k = rng.randint(1, qty)
        second = self.drug_visit(t2, b, y, drug, k)
        line2 = next(i for i in second["items"] if i["category"] == "drug")
        line2["trace_codes"] = rng.sample(line["trace_codes"], k)
        f = self.new_fraud("trace_code_reuse", "institution", y.institution_id, [a.card_id, b.card_id],
                           f"{k} package(s) of {DRUGS[drug].name} first sold at {x.institution_id} resold at "
                           f"{y.institution_id} {(t2 - t1) / 86400:.1f} days later",
                           trace_codes=line2["trace_codes"], first_institution_id=x.institution_id)
        f.events += [first, second]

    # =================================================================================
    def finish(self) -> tuple[list[dict], dict]:
        fraud_marks: dict[int, str] = {}
        for f in self.frauds:
            for ev in f.events:
                fraud_marks[id(ev)] = f.rule
        kept = [x for x in self.out if 0 <= x[0] < self.T]
        kept.sort(key=lambda x: (x[0], x[1]))
        events = []
        seq = self.seq_start
        for t, _, ev in kept:
            ev["event_time"] = self.fmt(t)
            ev["event_id"] = f"E{self.ymd(t)}{seq:09d}"
            seq += 1
            events.append(ev)
        alive = {id(ev) for ev in events}
        frauds_out = []
        all_ids: list[str] = []
        k = 0
        for f in self.frauds:
            evs = sorted((ev for ev in f.events if id(ev) in alive), key=lambda e: e["event_id"])
            if not evs:
                continue
            k += 1
            ids = [e["event_id"] for e in evs]
            rec: dict[str, Any] = {
                "fraud_id": f"F{self.chunk:03d}{k:04d}" if self.chunk else f"F{k:04d}",
                "rule": f.rule, "subject_type": f.subject_type, "subject_id": f.subject_id,
                "member_ids": list(dict.fromkeys(f.member_ids)), "event_ids": ids,
                "window_start": evs[0]["event_time"], "window_end": evs[-1]["event_time"], "note": f.note,
            }
            ctx = [e["event_id"] for e in f.context if id(e) in alive]
            if ctx:
                rec["context_event_ids"] = ctx
            rec.update(f.extra)
            frauds_out.append(rec)
            all_ids.extend(ids)
        fraud_cards = {m for f in frauds_out for m in f["member_ids"]}
        looks = [v for v in self.lookalikes.values()
                 if v["subject_id"] not in fraud_cards and not fraud_cards.intersection(v.get("member_ids", ()))]
        looks.sort(key=lambda v: (v["kind"], v["subject_id"]))
        labels = {
            "seed": self.seed, "cards": self.city.n_cards, "days": self.days,
            "start": self.start.isoformat(), "end": (self.start + timedelta(days=self.days)).isoformat(),
            "n_events": len(events), "frauds": frauds_out,
            "fraud_event_ids": sorted(set(all_ids)), "lookalikes": looks,
        }
        return events, labels


def _window(cards: int, days: int, seed: int, start: datetime | None, city: City | None, chunk: int,
            seq_start: int) -> tuple[list[dict], dict]:
    city = city or build_city(cards, seed)
    g = _Gen(city, seed, start or DEFAULT_START, days, chunk, seq_start)
    g.ordinary()
    g.inject_fraud()
    return g.finish()


def generate(cards: int, days: int, seed: int, start: datetime | None = None) -> tuple[list[dict], dict]:
    """Return (events sorted by event_time, labels) for ``cards`` insured over ``days`` days.

    ``start`` defaults to 2026-11-01T00:00+08:00, so the output is identical for a seed.
    About 0.045 settlements per card per day; injected fraud scales with cards x days
    (a handful per rule per 20,000 cards per week, at least one per rule).

    >>> events, labels = generate(cards=2000, days=2, seed=7)
    >>> len(events) == labels["n_events"] > 100
    True
    >>> events[0]["event_time"], events[0]["event_id"]
    ('2026-11-01T06:42:13+08:00', 'E20261101000000001')
    >>> all(a["event_time"] <= b["event_time"] for a, b in zip(events, events[1:]))
    True
    >>> sorted({f["rule"] for f in labels["frauds"]}) == sorted(RULES)
    True
    >>> generate(cards=2000, days=2, seed=7)[0] == events
    True
    """
    return _window(cards, days, seed, start, None, 0, 1)


def write(events: Iterable[dict], labels: dict | None, out: Path | str, labels_out: Path | str | None = None) -> None:
    """Write events as JSON Lines (``.jsonl`` or gzip ``.jsonl.gz``, byte-identical per seed) and labels as JSON."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dumps = orjson.dumps
    with open(out, "wb") as raw:
        fh = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if out.name.endswith(".gz") else raw
        try:
            buf: list[bytes] = []
            for ev in events:
                buf.append(dumps(ev))
                if len(buf) >= 10000:
                    fh.write(b"\n".join(buf) + b"\n")
                    buf.clear()
            if buf:
                fh.write(b"\n".join(buf) + b"\n")
        finally:
            if fh is not raw:
                fh.close()
    if labels_out is not None and labels is not None:
        p = Path(labels_out)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(orjson.dumps(labels, option=orjson.OPT_INDENT_2) + b"\n")


def iter_live(cards: int, seed: int, start: datetime, days_per_chunk: int = 1,
              labels_sink: Callable[[dict], None] | None = None) -> Iterator[dict]:
    """Endless time-ordered stream: ``days_per_chunk`` days after another, new fraud in each chunk.

    Ordinary life is a function of the calendar day, so the chunks join up (an inpatient
    stay opened in one chunk is discharged in a later one); event ids keep counting up.
    ``labels_sink`` receives each chunk's labels (fraud ids are prefixed with the chunk).
    Fraud is injected per chunk, so patterns spanning several days (7-day hopping,
    visits on >= 3 days, a ring recurring, a prescriber's baseline inside the chunk)
    need ``days_per_chunk`` >= 3-7; with 1-day chunks those rules see one-day variants.

    >>> from itertools import islice
    >>> evs = list(islice(iter_live(2000, 3, DEFAULT_START), 200))
    >>> len({e["event_id"] for e in evs}), evs[0]["event_time"] <= evs[-1]["event_time"]
    (200, True)
    """
    if days_per_chunk < 1:
        raise ValueError(f"days_per_chunk must be >= 1, got {days_per_chunk}")
    city = build_city(cards, seed)
    seq = 1
    chunk = 0
    while True:
        t0 = start + timedelta(days=chunk * days_per_chunk)
        events, labels = _window(cards, days_per_chunk, seed, t0, city, chunk + 1, seq)
        city.cards._cache.clear()
        if labels_sink is not None:
            labels_sink(labels)
        seq += len(events)
        chunk += 1
        yield from events


# ----------------------------------------------------------------------------- fast path

@lru_cache(maxsize=2)
def _fast_city(cards: int, seed: int) -> City:
    return build_city(cards, seed, personas=False)


def generate_day_fast(n_events: int, seed: int, *, day: date | None = None,
                      cards: int = 2_000_000) -> Iterator[bytes]:
    """Yield ``n_events`` JSON lines (bytes, each ending in ``\\n``) for one day of a big city.

    For throughput tests of the pipeline (Shanghai settles ~800k a day, peaks near 170/s):
    the city of ``cards`` insured (2 million by default) is built once, lazily, and cards
    are derived from their index, never stored.  Events are realistic ordinary
    settlements (community, hospital, emergency, pharmacy; registrations, exams, drugs
    with unique trace codes) in event-time order over the day, with the same day-time
    profile as :func:`generate`, but without per-card day plans, personas or injected
    fraud, which need memory of the past.  About 60-70k events/s on one core (1.2 M events
    in under 20 s); the city itself builds in well under a second.

    >>> lines = list(generate_day_fast(1000, seed=1))
    >>> len(lines), orjson.loads(lines[0])["event_time"][:10]
    (1000, '2026-11-01')
    """
    if n_events < 0:
        raise ValueError(f"n_events must be >= 0, got {n_events}")
    city = _fast_city(cards, seed)
    day = day or DEFAULT_START.date()
    rng = _rng(seed, "fast", day.toordinal())
    prefix = day.isoformat() + "T"
    ymd = day.strftime("%Y%m%d")
    fields = city.cards.fields
    ncards = city.n_cards
    insts = city.institutions
    dumps = orjson.dumps
    rand = rng.random

    def randrange(k: int) -> int:        # faster than Random.randrange, same determinism
        return int(rand() * k)

    # per-hour counts (largest remainder) and visit-kind mix by hour
    kinds = ("community", "hospital", "emergency", "pharmacy")
    base = (28.0, 34.0, 5.0, 33.0)
    profs = (_H_COMMUNITY, _H_OUTPATIENT, _H_EMERGENCY, _H_PHARMACY)
    hour_w = [sum(base[k] * profs[k][h] / sum(profs[k]) for k in range(4)) for h in range(24)]
    tot = sum(hour_w)
    raw_counts = [n_events * w / tot for w in hour_w]
    counts = [int(x) for x in raw_counts]
    for h in sorted(range(24), key=lambda h: counts[h] - raw_counts[h])[: n_events - sum(counts)]:
        counts[h] += 1
    kind_cum = [_cum([base[k] * profs[k][h] / sum(profs[k]) for k in range(4)]) for h in range(24)]

    # institution pickers per (district, type): 80 % home district, else a neighbour
    pick: dict[tuple[str, str], tuple[list[int], list[float]]] = {}
    for d in DISTRICTS:
        for t, lvl in (("community", 0), ("hospital", 0), ("pharmacy", 0), ("emergency", 2)):
            itype = "hospital" if t == "emergency" else t
            for dist in (d.code, *city.neighbours[d.code]):
                lst, cum = city.candidates(dist, itype, lvl, "急诊科" if t == "emergency" else None)
                if lst:
                    pick[(d.code, t)] = (lst, cum)
                    break
    neighbours = {d.code: city.neighbours[d.code][:4] for d in DISTRICTS}
    inst_static = [{"institution_id": i.institution_id, "institution_name": i.name, "institution_type": i.type,
                    "institution_level": i.level, "district": i.district} for i in insts]

    # recipes: (visit_type, dx code, dept prefs, [static lines], [drug codes]) by (kind, child)
    def recipes(table: Sequence[Dx], emergency: bool) -> list[tuple]:
        out = []
        for dx in table:
            for variant in range(4):
                r = random.Random(_key(seed, dx.code, variant, int(emergency)))
                codes = ["R0002" if emergency else "R0001"]
                for e in dx.exams:
                    if r.random() < 0.35 and e not in ("J0010", "J0011"):
                        codes.append(e)
                for tr in dx.treats:
                    if r.random() < 0.5:
                        codes.append(tr)
                drugs = [(c, 1 if r.random() < 0.7 else 2) for c in r.sample(dx.drugs, min(len(dx.drugs), 1 + (r.random() < 0.4)))] if dx.drugs else []
                out.append((dx, codes, drugs))
        return out

    rec = {("community", False): recipes(ADULT_DX, False), ("community", True): recipes(CHILD_DX, False),
           ("hospital", False): recipes(ADULT_DX, False), ("hospital", True): recipes(CHILD_DX, False),
           ("emergency", False): recipes(EMERGENCY_DX, True), ("emergency", True): recipes(EMERGENCY_DX, True)}
    amounts = {(c, q): round(d.unit_price * q, 2) for c, d in DRUGS.items() for q in (1, 2)}
    otc_adult = [c for c, d in DRUGS.items() if d.otc]
    otc_child = [c for c, d in DRUGS.items() if d.otc and d.child_ok]
    svc_lines = {}
    for code, (name, cat, price) in SERVICES.items():
        svc_lines[code] = {"code": code, "name": name, "category": cat, "quantity": 1, "unit_price": price, "amount": price}
    reg_lines = {}
    for i in insts:
        p = _REG_PRICE.get((i.type, i.level or 1), 20.0)
        reg_lines[i.index] = {"code": "R0001", "name": "普通门诊挂号", "category": "registration", "quantity": 1,
                              "unit_price": p, "amount": p}
    dept_cache: dict[tuple[int, tuple[str, ...]], tuple[str, list[str], list[float]]] = {}
    share_cache: dict[tuple, float] = {}
    trace_off = _key(seed, "fasttrace", day.toordinal()) % 10**13
    scramble = _scramble13
    trace_n = 0
    seq = 0
    ages_ok = REFERENCE_YEAR - 14

    for h in range(24):
        n_h = counts[h]
        if not n_h:
            continue
        secs = sorted(randrange(3600) for _ in range(n_h))
        kc = kind_cum[h]
        ktot = kc[-1]
        hh = f"{prefix}{h:02d}:"
        for s in secs:
            seq += 1
            card_id, pid, by, gender, cat, home = fields(randrange(ncards))
            child = by > ages_ok
            kind = kinds[bisect.bisect_right(kc, rand() * ktot)]
            if rand() < 0.2:
                dist = neighbours[home][randrange(4)]
            else:
                dist = home
            lst, cum = pick[(dist, kind)]
            inst = insts[lst[bisect.bisect_right(cum, rand() * cum[-1])]]
            items: list[dict]
            if kind == "pharmacy":
                pool = otc_child if child else otc_adult
                drug = DRUGS[pool[randrange(len(pool))]]
                q = 1 if rand() < 0.7 else 2
                items = [{"code": drug.code, "name": drug.name, "category": "drug", "quantity": q,
                          "unit_price": drug.unit_price, "amount": amounts[(drug.code, q)],
                          "days_supply": drug.days_supply * q}]
                if rand() < 0.88:
                    tc = []
                    for _ in range(q):
                        trace_n += 1
                        tc.append(f"{drug.trace_prefix}{scramble((trace_n + trace_off) % _E13):013d}")
                    items[0]["trace_codes"] = tc
                dept = phys = None
                dxl = None
                visit = "pharmacy"
            else:
                rl = rec[(kind, child)]
                dx, codes, drugs = rl[randrange(len(rl))]
                prefs = (("儿科",) + dx.depts) if child and kind != "emergency" else dx.depts
                dk = (inst.index, prefs)
                got = dept_cache.get(dk)
                if got is None:
                    dname = city.department(inst, prefs)
                    pl, pc = city.phys_by_inst_dept[(inst.index, dname)]
                    got = (dname, [p.physician_id for p in pl], pc)
                    dept_cache[dk] = got
                dept, pl, pc = got
                phys = pl[bisect.bisect_right(pc, rand() * pc[-1])] if len(pl) > 1 else pl[0]
                items = [reg_lines[inst.index] if codes[0] == "R0001" else svc_lines[codes[0]]]
                for c in codes[1:]:
                    items.append(svc_lines[c])
                for c, q in drugs:
                    drug = DRUGS[c]
                    line = {"code": c, "name": drug.name, "category": "drug", "quantity": q,
                            "unit_price": drug.unit_price, "amount": amounts[(c, q)],
                            "days_supply": drug.days_supply * q}
                    if rand() < 0.88:
                        tc = []
                        for _ in range(q):
                            trace_n += 1
                            tc.append(f"{drug.trace_prefix}{scramble((trace_n + trace_off) % _E13):013d}")
                        line["trace_codes"] = tc
                    items.append(line)
                dxl = [dx.code]
                visit = "emergency" if kind == "emergency" else "outpatient"
            total = round(sum(it["amount"] for it in items), 2)
            sk = (cat, inst.type, inst.level, visit)
            share = share_cache.get(sk)
            if share is None:
                share = share_cache[sk] = _fund_share(cat, inst.type, inst.level, visit)
            fund = round(total * share, 2)
            m, sec = divmod(s, 60)
            ev = {"event_id": f"E{ymd}{seq:09d}", "event_time": f"{hh}{m:02d}:{sec:02d}+08:00",
                  "card_id": card_id, "person_id": pid, "birth_year": by, "gender": gender, "insured_category": cat,
                  **inst_static[inst.index], "department": dept, "physician_id": phys, "visit_type": visit}
            if dxl is not None:
                ev["diagnoses"] = dxl
            ev["items"] = items
            ev["total_amount"] = total
            ev["fund_paid"] = fund
            ev["self_paid"] = round(total - fund, 2)
            yield dumps(ev, option=orjson.OPT_APPEND_NEWLINE)


# ----------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> None:
    """``python -m replay.city --cards 20000 --days 7 --seed 1 --out events.jsonl.gz --labels-out labels.json``"""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cards", type=int, default=20000)
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--labels-out", type=Path)
    a = ap.parse_args(argv)
    events, labels = generate(a.cards, a.days, a.seed)
    write(events, labels, a.out, a.labels_out)


if __name__ == "__main__":
    main()
