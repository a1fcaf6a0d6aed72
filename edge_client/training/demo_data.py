"""Built-in demo data: four small instruction tasks that mirror where fedge runs.

Each domain is a deterministic rule from a short text record to a short code:

- ``healthcare`` (clinic workstation): intake note -> triage code (complaint table, SpO2 override).
- ``finance`` (branch office): transaction line -> ledger account code (merchant table).
- ``education`` (school): syllabus question -> room or credit code (course table).
- ``iot`` (field sensors): sensor reading line -> alert code (per-sensor thresholds).

The codes are in a house format that a base model does not produce on its own (SmolLM2-135M-Instruct
scores 0% on every domain), while a few minutes of LoRA fine-tuning learns the rules. Templates, phrasings
and distractor fields (ids, dates, amounts, unused vitals) vary so the test split checks the rule, not
memorised strings.

Everything is stdlib and seeded with ``random.Random(str)`` (string seeds are hashed with SHA-512, so the
stream is the same on every machine and Python version). No sets or ``hash()`` are iterated. Train and test
are disjoint for any sizes: a record's split is fixed by a SHA-256 of its instruction and input.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

DOMAINS: tuple[str, ...] = ("healthcare", "finance", "education", "iot")
SPLITS: tuple[str, ...] = ("train", "test")
DEFAULT_SIZES: dict[str, int] = {"train": 400, "test": 100}

Record = dict[str, str]
_Example = tuple[str, str]  # (input text, output code)

_TEST_SHARE_PER_256 = 64  # records whose content hash byte is below this belong to test (25% of the space)
_MAX_TRIES_PER_RECORD = 200  # guards against asking for more unique records than a domain can produce

_FIRST = ("Ana", "Ben", "Chloe", "Dev", "Elif", "Femi", "Gus", "Hana", "Ivan", "Jia", "Kofi", "Lena",
          "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tariq")  # fmt: skip
_LAST = ("Park", "Ortiz", "Novak", "Singh", "Okafor", "Larsen", "Haddad", "Kim", "Rossi", "Mbeki",
         "Tanaka", "Weber", "Silva", "Dubois", "Ali", "Moreau")  # fmt: skip

# --- healthcare: complaint -> triage level; SpO2 below the threshold always means resuscitation ---------
TRIAGE_CODES: tuple[str, ...] = ("T1-RESUS", "T2-URGENT", "T3-SEMI", "T4-ROUTINE")
TRIAGE_TABLE: dict[str, str] = {
    "unresponsive": "T1-RESUS", "not breathing": "T1-RESUS",
    "major bleeding": "T1-RESUS", "ongoing seizure": "T1-RESUS",
    "chest pain": "T2-URGENT", "stroke symptoms": "T2-URGENT",
    "severe burn": "T2-URGENT", "head injury": "T2-URGENT",
    "high fever": "T3-SEMI", "broken arm": "T3-SEMI",
    "kidney stone pain": "T3-SEMI", "asthma flare": "T3-SEMI",
    "sore throat": "T4-ROUTINE", "skin rash": "T4-ROUTINE",
    "earache": "T4-ROUTINE", "medication refill": "T4-ROUTINE",
}  # fmt: skip
SPO2_RESUS_BELOW = 90  # percent
_HEALTH_INSTRUCTIONS = (
    "Assign the clinic triage code for this intake note.",
    "What triage code does this patient get? Reply with the code only.",
    "Triage the following patient.",
)
_HEALTH_TEMPLATES = (
    "{age}{sex}, c/o {complaint}. HR {hr}, T {temp}C, SpO2 {spo2}%, BP {sys}/{dia}.",
    "Patient ({age} y, {sex_word}) arrived {time} reporting {complaint}; SpO2 {spo2}%, pulse {hr}.",
    "Intake | complaint: {complaint} | spo2={spo2} | hr={hr} | bp={sys}/{dia} | age={age}",
    "Walk-in at {time}: {complaint}. Oxygen sat {spo2}%, heart rate {hr} bpm, {age} years old.",
)


def triage_code(complaint: str, spo2: int) -> str:
    """Triage rule: resuscitation if SpO2 (percent) is below 90, else the complaint's table level."""
    return TRIAGE_CODES[0] if spo2 < SPO2_RESUS_BELOW else TRIAGE_TABLE[complaint]


def _healthcare(rng: random.Random) -> _Example:
    complaint = rng.choice(list(TRIAGE_TABLE))
    # Keep SpO2 clear of the threshold (80-88 or 94-99): the first digit alone decides.
    spo2 = rng.randint(80, 88) if rng.random() < 0.12 else rng.randint(94, 99)
    sex = rng.choice("MF")
    text = rng.choice(_HEALTH_TEMPLATES).format(
        age=rng.randint(2, 94), sex=sex, sex_word="male" if sex == "M" else "female",
        complaint=complaint, hr=rng.randint(52, 135), temp=f"{rng.uniform(35.8, 40.2):.1f}",
        spo2=spo2, sys=rng.randint(90, 175), dia=rng.randint(55, 105),
        time=f"{rng.randint(0, 23):02d}:{rng.choice((0, 15, 30, 45)):02d}",
    )  # fmt: skip
    return text, triage_code(complaint, spo2)


# --- finance: merchant -> ledger account; amounts, dates, cards and references are distractors ----------
LEDGER_CODES: tuple[str, ...] = ("6100-TRAVEL", "6200-MEALS", "6300-OFFICE", "6400-SOFTWARE",
                                 "6500-UTILITIES", "6600-RENT", "6700-FUEL", "6800-INSURANCE")  # fmt: skip
MERCHANT_TABLE: dict[str, str] = {
    "Skyway Airlines": "6100-TRAVEL", "Metro Rail": "6100-TRAVEL", "Harbor Hotel": "6100-TRAVEL",
    "Blue Fork Bistro": "6200-MEALS", "Corner Cafe": "6200-MEALS", "Pizza Palace": "6200-MEALS",
    "Paperworks Supply": "6300-OFFICE", "Inkjet Depot": "6300-OFFICE", "Deskmart": "6300-OFFICE",
    "CloudNine": "6400-SOFTWARE", "CodeForge": "6400-SOFTWARE", "Mailstream": "6400-SOFTWARE",
    "City Water": "6500-UTILITIES", "VoltGrid Energy": "6500-UTILITIES", "Fiberlink": "6500-UTILITIES",
    "Oaktree Properties": "6600-RENT", "Summit Leasing": "6600-RENT", "Parkview Realty": "6600-RENT",
    "Shellby Gas": "6700-FUEL", "QuickFuel": "6700-FUEL", "Petromax": "6700-FUEL",
    "SafeHaven": "6800-INSURANCE", "Guardian Mutual": "6800-INSURANCE", "Shieldco": "6800-INSURANCE",
}  # fmt: skip
_FIN_INSTRUCTIONS = (
    "Post this transaction to the ledger. Give the account code.",
    "Which ledger account does this bank line belong to?",
    "Categorise the transaction for the branch books.",
)
_FIN_TEMPLATES = (
    "POS {date_us} {MERCHANT} #{store} {amount} USD",
    "Card ****{last4} charged ${amount} at {merchant} on {date_iso}.",
    "{date_iso},{MERCHANT},-{amount},ref {ref}",
    "ACH DEBIT {MERCHANT} ID{ref} AMT {amount}",
    "Paid {merchant} {amount} EUR ({city}, {date_us})",
)
_CITIES = ("Lyon", "Austin", "Porto", "Leeds", "Graz", "Osaka", "Tulsa", "Cork")


def _finance(rng: random.Random) -> _Example:
    merchant = rng.choice(list(MERCHANT_TABLE))
    month, day = rng.randint(1, 12), rng.randint(1, 28)
    text = rng.choice(_FIN_TEMPLATES).format(
        merchant=merchant, MERCHANT=merchant.upper(), amount=f"{rng.uniform(3, 4800):.2f}",
        date_us=f"{month:02d}/{day:02d}", date_iso=f"2024-{month:02d}-{day:02d}",
        store=rng.randint(100, 9999), last4=rng.randint(1000, 9999), ref=rng.randint(10000, 999999),
        city=rng.choice(_CITIES),
    )  # fmt: skip
    return text, MERCHANT_TABLE[merchant]


# --- education: syllabus lookup by course code or title; student names, days and terms are distractors ---
@dataclass(frozen=True)
class Department:
    """Where a department teaches and what its courses are worth."""

    room: str
    credits: int


DEPARTMENTS: dict[str, Department] = {
    "BIO": Department("S104", 4), "CHEM": Department("L210", 4), "MATH": Department("M301", 5),
    "PHYS": Department("S220", 4), "HIST": Department("H115", 3), "ENG": Department("H230", 3),
    "CS": Department("C140", 5), "ART": Department("A010", 2),
}  # fmt: skip
COURSES: dict[str, str] = {  # course code (department prefix + number) -> title
    "BIO110": "Cell Biology", "BIO220": "Ecology", "CHEM101": "General Chemistry",
    "MATH140": "Calculus I", "MATH250": "Linear Algebra", "PHYS120": "Mechanics",
    "HIST105": "World History", "ENG100": "Academic Writing", "ENG230": "Poetry Workshop",
    "CS101": "Programming Basics", "CS240": "Data Structures", "ART130": "Drawing Studio",
}  # fmt: skip
CREDIT_VALUES: tuple[int, ...] = (2, 3, 4, 5)
SYLLABUS_CODES: tuple[str, ...] = (
    *(f"RM-{dept.room}" for dept in DEPARTMENTS.values()),
    *(f"CR-{n}" for n in CREDIT_VALUES),
)
_EDU_INSTRUCTIONS = (
    "Answer from the school syllabus.",
    "Look this up in the course catalogue. Reply with the code only.",
    "Syllabus question from the front office.",
)
_EDU_QUESTIONS = {  # asked attribute -> phrasings
    "room": (
        "Where does {ref} meet?",
        "{name} asks which room {ref} is taught in.",
        "Room for {ref} on {day}?",
        "{day} {term}: {name} cannot find the {ref} classroom.",
    ),
    "credits": (
        "How many credits is {ref} worth?",
        "{name} wants the credit value of {ref}.",
        "Credits for {ref} ({term} term)?",
        "{day}: {name} is adding {ref}; how many credits?",
    ),
}
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")


def syllabus_answer(course: str, asked: str) -> str:
    """Syllabus rule: the course's department room (``RM-S104``) or credits (``CR-4``), as asked."""
    dept = DEPARTMENTS[course.rstrip("0123456789")]
    return f"RM-{dept.room}" if asked == "room" else f"CR-{dept.credits}"


def _education(rng: random.Random) -> _Example:
    code = rng.choice(list(COURSES))
    asked = rng.choice(list(_EDU_QUESTIONS))
    ref = rng.choice((code, COURSES[code], f"{code} {COURSES[code]}"))
    text = rng.choice(_EDU_QUESTIONS[asked]).format(
        ref=ref, name=f"{rng.choice(_FIRST)} {rng.choice(_LAST)}", day=rng.choice(_DAYS),
        term=rng.choice(("Fall", "Spring", "Summer")),
    )  # fmt: skip
    return text, syllabus_answer(code, asked)


# --- iot: sensor kind + value -> alert code by per-kind thresholds --------------------------------------
@dataclass(frozen=True)
class Sensor:
    """One IoT sensor kind: the field names devices use, its unit, and its alert limits."""

    keys: tuple[str, ...]
    unit: str
    low: float | None  # below this: KIND-LO (None: the sensor has no low alert)
    high: float | None  # above this: KIND-HI (None: no high alert)
    decimals: int
    # level -> sampled value range, clear of the limits. LO values start with 1, HI values with 8 or 9, OK
    # values with 3-6 (5-9 for the battery, which has no HI): a first-digit rule, which a 135M model learns
    # far faster than magnitude comparison. The templates carry few other digits for the same reason.
    ranges: dict[str, tuple[float, float]]


IOT_SENSORS: dict[str, Sensor] = {
    "TMP": Sensor(("temp_c", "temp"), "C", None, 75, 1, {"OK": (30, 69.9), "HI": (80, 99.9)}),
    "HUM": Sensor(("humidity", "rh"), "%", None, 75, 0, {"OK": (30, 69), "HI": (80, 99)}),
    "BAT": Sensor(("battery", "bat_pct"), "%", 20, None, 0, {"LO": (10, 19), "OK": (50, 99)}),
    "PRS": Sensor(("pressure", "psi"), "psi", None, 75, 1, {"OK": (30, 69.9), "HI": (80, 99.9)}),
    "VIB": Sensor(("vibration", "vib_mm_s"), "mm/s", None, 7.5, 1, {"OK": (3, 6.9), "HI": (8, 9.9)}),
    "CO2": Sensor(("co2_ppm", "co2"), "ppm", None, 750, 0, {"OK": (300, 689), "HI": (800, 999)}),
}  # fmt: skip
IOT_CODES: tuple[str, ...] = tuple(f"{kind}-{level}" for kind, sensor in IOT_SENSORS.items() for level in sensor.ranges)
_NODE_SITES = ("pump", "gateway", "silo", "mast", "kiln", "tank")
_IOT_INSTRUCTIONS = (
    "Give the alert code for this sensor reading.",
    "Check this field-sensor line and return its alert code.",
    "Classify the reading for the alarm panel.",
)
_IOT_TEMPLATES = (
    "node={node} {key}={value} link=up",
    "[{ts}] {node}: {key} reading {value} {unit}",
    '{{"dev":"{node}","{key}":{value},"unit":"{unit}"}}',
    "{node},{key},{value}",
)


def iot_code(kind: str, value: float) -> str:
    """Alert rule: ``KIND-LO`` below the low limit, ``KIND-HI`` above the high limit, else ``KIND-OK``."""
    sensor = IOT_SENSORS[kind]
    if sensor.low is not None and value < sensor.low:
        return f"{kind}-LO"
    if sensor.high is not None and value > sensor.high:
        return f"{kind}-HI"
    return f"{kind}-OK"


def _iot(rng: random.Random) -> _Example:
    kind = rng.choice(list(IOT_SENSORS))
    sensor = IOT_SENSORS[kind]
    level = rng.choice(list(sensor.ranges))  # OK or the kind's one alert level, 50/50
    shown = f"{rng.uniform(*sensor.ranges[level]):.{sensor.decimals}f}"  # the rule reads the shown value
    text = rng.choice(_IOT_TEMPLATES).format(
        node=f"{rng.choice(_NODE_SITES)}-{rng.choice('ABCDEFGH')}", key=rng.choice(sensor.keys), value=shown,
        unit=sensor.unit, ts=f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}",
    )  # fmt: skip
    return text, iot_code(kind, float(shown))


# --- public API -----------------------------------------------------------------------------------------
_GENERATORS: dict[str, tuple[Callable[[random.Random], _Example], tuple[str, ...]]] = {
    "healthcare": (_healthcare, _HEALTH_INSTRUCTIONS),
    "finance": (_finance, _FIN_INSTRUCTIONS),
    "education": (_education, _EDU_INSTRUCTIONS),
    "iot": (_iot, _IOT_INSTRUCTIONS),
}
_ANSWER_SPACES: dict[str, tuple[str, ...]] = {
    "healthcare": TRIAGE_CODES,
    "finance": LEDGER_CODES,
    "education": SYLLABUS_CODES,
    "iot": IOT_CODES,
}
_DESCRIPTIONS: dict[str, str] = {
    "healthcare": "Clinic intake note -> triage code (T1-RESUS..T4-ROUTINE) from a complaint table; "
    "SpO2 below 90% is always T1-RESUS.",
    "finance": "Bank transaction line -> ledger account code (e.g. 6200-MEALS) from a table of 24 merchants.",
    "education": "Syllabus question about a course (by code or title) -> its department's room (RM-S104) "
    "or credits (CR-4).",
    "iot": "Field-sensor reading -> alert code KIND-LO/OK/HI by fixed per-sensor thresholds (e.g. HUM-HI).",
}


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown demo domain {domain!r}; choose one of {', '.join(DOMAINS)}")


def describe(domain: str) -> str:
    """One-line description of a demo domain's task. Raises ValueError for an unknown domain."""
    _check_domain(domain)
    return _DESCRIPTIONS[domain]


def answer_space(domain: str) -> tuple[str, ...]:
    """Every output code the domain's rule can produce. Raises ValueError for an unknown domain."""
    _check_domain(domain)
    return _ANSWER_SPACES[domain]


def split_of(instruction: str, input_text: str) -> str:
    """The split ("train" or "test") a record belongs to, fixed by a SHA-256 of its prompt text."""
    digest = hashlib.sha256(f"{instruction}\n{input_text}".encode()).digest()
    return "test" if digest[0] < _TEST_SHARE_PER_256 else "train"


def generate(domain: str, split: str = "train", n: int | None = None, seed: int = 0) -> list[Record]:
    """Deterministic demo records ``{"instruction", "input", "output"}`` for one domain and split.

    ``n`` defaults to 400 for train and 100 for test. Records are unique within a split, and train and
    test never share an instruction+input pair, for any ``n`` and ``seed``. The same arguments give the
    same list on every machine. Raises ValueError for an unknown domain or split, or a negative ``n``.
    """
    _check_domain(domain)
    if split not in SPLITS:
        raise ValueError(f"unknown demo split {split!r}; choose one of {', '.join(SPLITS)}")
    size = DEFAULT_SIZES[split] if n is None else n
    if size < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    make_example, instructions = _GENERATORS[domain]
    rng = random.Random(f"fedge-demo:{domain}:{split}:{seed}")
    records: list[Record] = []
    seen: dict[tuple[str, str], None] = {}  # insertion-ordered; used only for membership
    for _ in range(size * _MAX_TRIES_PER_RECORD):
        if len(records) == size:
            break
        text, answer = make_example(rng)
        instruction = rng.choice(instructions)
        key = (instruction, text)
        if key in seen or split_of(instruction, text) != split:
            continue
        seen[key] = None
        records.append({"instruction": instruction, "input": text, "output": answer})
    if len(records) < size:
        raise ValueError(f"could only generate {len(records)} unique {domain}/{split} records, asked for {size}")
    return records
