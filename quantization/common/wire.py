"""What travels between the server and the clients: record, config and metric names, and adapter arrays.

Both sides import this module, the server without torch, so every key is named here once. Adapter
tensors travel as float32 numpy arrays keyed by their PEFT state-dict name
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import reprlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fedge.common.lora import METHODS
from fedge.common.models import DEFAULT_MODEL
from fedge.common.settings import from_config, setting, to_config

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

    from fedge.common.modeling import LoraSettings

# How a client's failure says it lacks the LoRA A a message left out (`Cfg.LORA_A`): the server sends it again
LORA_A_MISSING = "LoRA A missing"

# RecordDict entries
ADAPTER = "adapter"  # ArrayRecord: the global adapter (server -> client) or the trained one (reply)
CONFIG = "config"  # ConfigRecord: the round's instructions (server -> client)
METRICS = "metrics"  # MetricRecord: numbers about the client's work (reply)
CLIENT = "client"  # ConfigRecord: who replied (reply)


MIN_SEQ_LEN = 16  # the shortest training row `TrainConfig` takes
MAX_SEED = 2**32 - 1  # a client seeds round n with seed x 1000 + n, and torch takes 64 bits


class Cfg:
    """ConfigRecord keys, server -> client, beyond `RoundSettings`' own (whose keys are its field names)."""

    ROUND = "server-round"  # Flower's FedAvg sets this one itself
    # 1: before training, score the received global adapter on the held-out data and send that evaluation in the
    # train reply's metrics under `Metric.PRIOR` (one message per round instead of a train and an evaluate message)
    SCORE_FIRST = "score-first"
    # the fingerprint (`fingerprint`) of the frozen LoRA A: the adapter record leaves A out for nodes that said they
    # hold it (`Client.LORA_A`) and carries it for the others, who keep it (fedge.edge_client.federation.frozen_a);
    # absent when A is not frozen (the record carries the whole adapter, and nothing is kept)
    LORA_A = "lora-a"


class Metric:
    """MetricRecord keys, client -> server."""

    EXAMPLES = "num-examples"  # local training examples: FedAvg's weighting key
    STEPS = "steps"
    TOKENS = "tokens"
    TRAIN_LOSS = "train-loss"
    TRAIN_SECONDS = "train-seconds"
    STARTUP_SECONDS = "startup-seconds"  # process start -> message handler (imports, Flower plumbing)
    LOAD_SECONDS = "load-seconds"  # base model load (+ LoRA wrap), from the local model cache
    PEAK_RSS_MB = "peak-rss-mb"
    RESUMED = "resumed"  # 1 if the reply came from work finished before a restart
    WARM = "warm"  # 1 if the device's warm worker (model already loaded) did the work
    EXACT_MATCH = "exact-match"
    HELDOUT_LOSS = "heldout-loss"
    EVAL_EXAMPLES = "eval-examples"
    ENERGY_J = "energy-j"  # the round's local training, by the method in Client.ENERGY_METHOD
    UPLOAD_BYTES = "upload-bytes"  # the encoded update's payload
    UPLOAD_SECONDS = "upload-seconds"  # emulated link time of the upload (0 on a real link: Flower sends it)
    ROUND_SECONDS = "round-seconds"  # the round on the device: load, train, encode, upload
    DEADLINE_S = "deadline-s"  # the deadline the client planned for (0: none)
    EVAL_SECONDS = "eval-seconds"  # scoring the global adapter on the held-out examples
    PRIOR = "prior-"  # prefixes a train reply's evaluation of the adapter it received (`Cfg.SCORE_FIRST`)


class Client:
    """ConfigRecord keys describing the replying client."""

    NAME = "name"
    DATA = "data"
    DEVICE = "device"
    PLAN = "plan"  # the training plan as JSON (adaptive rounds)
    CODEC = "codec"  # the update codec spec the client used
    PROFILE = "device-profile"  # the emulated device, if any
    ENERGY_METHOD = "energy-method"  # how energy-j was had: "rapl", "pmic", "ina3221", "battery", "estimated", ...
    LORA_A = "lora-a"  # the fingerprint of the frozen LoRA A this node holds (`Cfg.LORA_A`), once it has kept it


# A packed record: every tensor's bytes in one uint8 array, and a JSON index of [name, dtype, shape] in another.
# Flower moves each Array of a record as its own objects (one request per object on every hop: SuperLink,
# SuperNode, ClientApp), so a LoRA adapter of 420 tensors cost ~850 requests a message; packed, it is a handful.
PACKED_INDEX, PACKED_DATA = "fedge.index", "fedge.data"


def to_record(arrays: dict[str, np.ndarray], packed: bool = True) -> ArrayRecord:
    """Adapter arrays -> ArrayRecord, packed (see `PACKED_INDEX`) or one Array per tensor; names and order kept."""
    from flwr.app import Array, ArrayRecord

    if not packed:
        return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})
    index = json.dumps([[name, a.dtype.str, list(a.shape)] for name, a in arrays.items()]).encode()
    data = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays.values())
    return ArrayRecord(
        {PACKED_INDEX: Array(np.frombuffer(index, np.uint8)), PACKED_DATA: Array(np.frombuffer(data, np.uint8))}
    )


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord (packed or not) -> adapter arrays (numpy, copies)."""
    if set(record) == {PACKED_INDEX, PACKED_DATA}:
        return _unpack(_read_npy(PACKED_INDEX, record[PACKED_INDEX]), _read_npy(PACKED_DATA, record[PACKED_DATA]))
    return {name: array.numpy() for name, array in record.items()}


MAX_ARRAYS = 100_000  # tensors in one adapter record (a 7B model's LoRA on every projection has ~1,500)
MAX_NAME = 400  # characters in a tensor's name (PEFT's longest for the models fedge knows: ~80)
# a packed record's index: ~130 bytes a tensor (a 7B model's LoRA on every projection: ~1,500 tensors, ~200 KB);
# capped because parsing JSON takes ~20x its size
MAX_INDEX_BYTES = 4 << 20
_DTYPE_CODE = re.compile(r"[<>|][biuf][0-9]{1,2}")
_NUMERIC = "biuf"  # numpy dtype kinds a record may carry: no objects, strings or structured dtypes


def read_record(record: object, max_bytes: int) -> dict[str, np.ndarray]:
    """A record that arrived from the network -> arrays; ValueError naming the problem otherwise.

    Flower's ``Array.numpy`` trusts the ``.npy`` header inside each array's bytes and allocates what it claims
    before reading; here the record's type, the tensor count, the total size (at most ``max_bytes``) and each
    header (a plain numeric dtype, a shape whose size is exactly the bytes that follow) are checked first.
    """
    from flwr.app import ArrayRecord

    if not isinstance(record, ArrayRecord):
        raise ValueError(f"the adapter must be an ArrayRecord, got a {type(record).__name__}")
    if len(record) > MAX_ARRAYS:
        raise ValueError(f"the adapter record holds {len(record)} arrays, at most {MAX_ARRAYS}")
    sizes = [len(a.data) if isinstance(a.data, bytes) else -1 for a in record.values()]
    if min(sizes, default=0) < 0 or sum(sizes) > max_bytes:
        raise ValueError(f"the adapter record holds {sum(sizes)} bytes, at most {max_bytes} expected")
    if PACKED_INDEX in record or PACKED_DATA in record:
        if set(record) != {PACKED_INDEX, PACKED_DATA}:
            raise ValueError(f"a packed adapter record holds {PACKED_INDEX!r} and {PACKED_DATA!r}, nothing else")
        return _unpack(_read_npy(PACKED_INDEX, record[PACKED_INDEX]), _read_npy(PACKED_DATA, record[PACKED_DATA]))
    return {str(name): _read_npy(str(name)[:200], array) for name, array in record.items()}


def _unpack(index: np.ndarray, data: np.ndarray) -> dict[str, np.ndarray]:
    """A packed record's tensors; ValueError naming what is wrong with its index (each entry checked before any
    tensor is cut out, and the index must account for every byte of the data)."""
    if index.dtype != np.uint8 or data.dtype != np.uint8 or index.ndim != 1 or data.ndim != 1:
        raise ValueError(f"a packed record's {PACKED_INDEX} and {PACKED_DATA} must be 1-D uint8 arrays")
    if index.size > MAX_INDEX_BYTES:
        raise ValueError(f"{PACKED_INDEX}: {index.size} bytes, at most {MAX_INDEX_BYTES}")
    try:
        entries = json.loads(index.tobytes())
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{PACKED_INDEX}: not JSON ({str(err)[:80]})") from None
    if not isinstance(entries, list) or len(entries) > MAX_ARRAYS:
        raise ValueError(f"{PACKED_INDEX}: expected a list of at most {MAX_ARRAYS} [name, dtype, shape] entries")
    layout, offset = [], 0
    for i, entry in enumerate(entries):
        name, dtype, shape = _index_entry(i, entry)
        size = math.prod(shape) * dtype.itemsize
        layout.append((name, dtype, shape, offset))
        offset += size
        if offset > data.size:
            break
    if offset != data.size:
        raise ValueError(f"{PACKED_INDEX} describes {offset} bytes of tensors, {PACKED_DATA} holds {data.size}")
    if len({name for name, *_ in layout}) != len(layout):
        raise ValueError(f"{PACKED_INDEX}: a tensor name appears twice")
    return {
        name: np.frombuffer(data, dtype, math.prod(shape), offset).reshape(shape).copy()
        for name, dtype, shape, offset in layout
    }


def _index_entry(i: int, entry: object) -> tuple[str, np.dtype, tuple[int, ...]]:
    """One [name, dtype, shape] entry of a packed record's index, checked; ValueError naming it otherwise."""
    where = f"{PACKED_INDEX} entry {i}"
    if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and isinstance(entry[1], str)):
        raise ValueError(f"{where}: expected [name, dtype, shape], got {reprlib.repr(entry)}")
    name, code, shape = entry
    if not 0 < len(name) <= MAX_NAME:
        raise ValueError(f"{where}: a tensor name must have 1..{MAX_NAME} characters")
    if not (isinstance(shape, list) and len(shape) <= 8 and all(type(d) is int and 0 <= d < 2**40 for d in shape)):
        raise ValueError(f"{where} ({name[:80]}): shape {reprlib.repr(shape)} is not a list of at most 8 sizes")
    # only a canonical code (what numpy's dtype.str gives: byte order, kind, size) reaches np.dtype, which parses
    # anything else as a type expression (and raises SyntaxError on some)
    try:
        dtype = np.dtype(code) if _DTYPE_CODE.fullmatch(code) else None
    except TypeError:  # a size numpy has no type of (<f3)
        dtype = None
    if dtype is None or dtype.kind not in _NUMERIC or dtype.hasobject or dtype.fields is not None:
        raise ValueError(f"{where} ({name[:80]}): dtype {code[:20]!r} is not a plain number type")
    return name, dtype, tuple(shape)


def _read_npy(name: str, array) -> np.ndarray:
    import io

    from flwr.common.constant import SType

    if array.stype != SType.NUMPY:
        raise ValueError(f"tensor {name}: serialized as {str(array.stype)[:40]!r}, expected numpy")
    buf = io.BytesIO(array.data)
    try:
        version = np.lib.format.read_magic(buf)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read:
            raise ValueError(f".npy format {version}")
        shape, fortran, dtype = read[version](buf, max_header_size=10_000)
    except Exception as err:  # noqa: BLE001 (numpy parses the header with ast and tokenize: any of their errors)
        raise ValueError(f"tensor {name}: not a numpy array ({type(err).__name__}: {str(err)[:100]})") from None
    body = len(array.data) - buf.tell()
    if dtype.kind not in _NUMERIC or dtype.hasobject or dtype.fields is not None or fortran:
        raise ValueError(f"tensor {name}: dtype {dtype} is not a plain number type")
    if math.prod(shape) * dtype.itemsize != body:
        raise ValueError(f"tensor {name}: shape {shape} of {dtype} needs {math.prod(shape) * dtype.itemsize} "
                         f"bytes, {body} sent")  # fmt: skip
    return np.frombuffer(array.data, dtype=dtype, offset=buf.tell()).reshape(shape).copy()


def record_bytes(record: ArrayRecord) -> int:
    """Serialized payload size of an ArrayRecord: the bytes that cross the link."""
    return sum(len(array.data) for array in record.values())


def fingerprint(arrays: dict[str, np.ndarray]) -> str:
    """A content hash of adapter arrays (names, shapes, dtypes, values), hex, 16 chars."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.shape}|{a.dtype}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


@dataclass
class TrainingPlan:
    """How to train this round, with the predictions and the reason for each choice. JSON-able.

    ``top_layers`` is the number of last decoder layers that train (None: all). Seconds and bytes.
    ``calibration`` is measured / predicted step time (1.0 until `replan` has measured steps).

    In a federation the adapter's tensors are fixed (rank r_max on every layer): a plan with fewer layers or a
    lower rank trains a part of them (the top layers; the first ``lora_r`` rows of A / columns of B) and leaves
    the rest at the global values. The cost models count LoRA state and upload for the trained part only;
    wrapping the full adapter and freezing the rest adds ~20 MB (SmolLM2, r=16, 7 targets) and few FLOPs.
    """

    feasible: bool
    precision: str
    compute_dtype: str
    lora_r: int
    targets: tuple[str, ...]
    top_layers: int | None
    seq_len: int
    micro_batch: int
    grad_accum: int
    gradient_checkpointing: bool
    loss_chunk: int
    steps: int
    requested_steps: int
    predicted_step_s: float
    predicted_s: float
    predicted_peak_bytes: int
    predicted_upload_bytes: int
    predicted_upload_s: float
    calibration: float = 1.0
    reasons: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> TrainingPlan:
        """From `to_dict` output, which may have crossed the network or a file: every field is checked for its
        type (ints for counts, finite numbers for predictions, strings for names); ValueError naming the field."""
        if not isinstance(data, dict):
            raise ValueError(f"a training plan is a JSON object, got {type(data).__name__}")
        data = dict(data)
        targets = data.get("targets")
        if not isinstance(targets, list | tuple) or not all(isinstance(t, str) and len(t) < 128 for t in targets):
            raise ValueError("plan field 'targets': expected a list of module names")
        data["targets"] = tuple(targets)
        reasons = data.get("reasons", {})
        if not isinstance(reasons, dict) or not all(isinstance(v, str) for v in reasons.values()):
            raise ValueError("plan field 'reasons': expected an object of strings")
        for f in dataclasses.fields(cls):
            if f.name not in data or f.name in ("targets", "reasons"):
                continue
            value, kind = data[f.name], _PLAN_TYPES.get(f.name)
            ok = (
                (kind is bool and isinstance(value, bool))
                or (kind is str and isinstance(value, str) and len(value) < 64)
                or (kind is int and type(value) is int and 0 <= value < 2**31)
                or (kind == "bytes" and type(value) is int and 0 <= value <= MAX_PLAN_BYTES)
                or (kind == "int?" and (value is None or type(value) is int and 0 <= value < 2**31))
                or (
                    kind is float
                    and (type(value) is float or type(value) is int and abs(value) < 2**63)
                    and math.isfinite(value)
                )
            )
            if not ok:
                raise ValueError(f"plan field {f.name!r}: {str(value)[:40]!r} is not a valid value")
        return cls(**data)

    def train_overrides(self) -> dict:
        """TrainConfig fields this plan sets (apply with ``dataclasses.replace``; LoRA fields: `lora_overrides`)."""
        return {
            "steps": self.steps,
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "seq_len": self.seq_len,
            "gradient_checkpointing": self.gradient_checkpointing,
            "loss_chunk": self.loss_chunk,
        }

    def lora_overrides(self) -> dict:
        """LoraSettings fields this plan sets."""
        return {"r": self.lora_r, "target_modules": self.targets, "top_layers": self.top_layers}


_PLAN_TYPES = {
    "feasible": bool, "precision": str, "compute_dtype": str, "lora_r": int, "top_layers": "int?", "seq_len": int,
    "micro_batch": int, "grad_accum": int, "gradient_checkpointing": bool, "loss_chunk": int, "steps": int,
    "requested_steps": int, "predicted_step_s": float, "predicted_s": float, "predicted_peak_bytes": "bytes",
    "predicted_upload_bytes": "bytes", "predicted_upload_s": float, "calibration": float,
}  # fmt: skip
# Bytes a plan may predict (memory, upload): counts stay below 2**31, but a laptop planning a 270M model with a 262k
# vocabulary predicts 2.1 GiB of memory. More than any edge device holds (4 TiB) is no plan.
MAX_PLAN_BYTES = 2**42


@dataclass
class RoundSettings:
    """What every client does in a round, sent in the train/evaluate ConfigRecord; ``--flags`` and a config file's
    ``[round]`` table on ``fedge server start`` and ``fedge demo``."""

    model: str = setting(DEFAULT_MODEL, "base model every client trains on: a built-in name, directory or .gguf")
    # 10 rounds x 40 steps of 2 (benchmarks/README.md, "federated_quality.py"): at the same examples, more and
    # smaller steps move the federation further: FedAvg 86.0/85.0/92.0% over 3 seeds, 81.0/86.5/73.5% at 20 of 4.
    # A step's fixed cost makes a round ~1.3x slower on a CPU, so the demo reaches 80% no sooner in minutes.
    steps: int = setting(40, "local training steps per round")
    lr: float = setting(2e-3, "clients' learning rate")
    batch: int = setting(2, "examples per local step")
    seq_len: int = setting(256, "longest row in tokens (the data's longest example, if shorter, is used)")
    seed: int = setting(0, "seeds the adapter's init (the same on every client) and the data order")
    lora_r: int = setting(16, "LoRA rank of the global adapter", flag="--rank")
    lora_alpha: int = setting(0, "LoRA alpha: the adapter's scale is alpha / rank (0: 2 x rank)", flag="--alpha")
    lora_targets: str = setting(
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "comma-separated LoRA target modules",
        flag="--targets",
    )  # fmt: skip
    eval_examples: int = setting(50, "held-out examples each client scores the global adapter on")
    lora_merge: str = setting(
        "zero-pad", "how clients of lower rank get the global adapter and the server merges theirs back: zero-pad "
        "(HetLoRA) or svd (FlexLoRA: the best low-rank cut and a weight-space average; for a trained A)",
        choices=METHODS,
    )  # fmt: skip
    # Train LoRA B only, A fixed at its seeded init, the same on every client (FFA-LoRA, Sun et al. 2024): the
    # average of B_i @ A is then exactly the average of the clients' weight changes, where averaging A and B
    # separately multiplies each client's own change by 1/clients^2 plus cross terms.
    lora_freeze_a: bool = setting(True, "train LoRA B only, A fixed at its shared seeded init (FFA-LoRA)")
    deadline_s: float = setting(
        0.0, "each client plans its round (precision, rank, layers, steps) to finish within it; 0: train as sent",
        flag="--deadline", metavar="SECONDS",
    )  # fmt: skip
    codec: str = setting(
        "", "clients send their change encoded: int8, int4, mix:0.9+int4:256, int3, topk:0.1+int4, ... or auto / "
        "auto:CEILING (each by its uplink); '': the whole fp32 adapter", metavar="SPEC",
    )  # fmt: skip
    plan: str = setting(
        "", "a pinned training plan (a reply's plan JSON): every client trains exactly it, no (re)planning",
        metavar="JSON",
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.lora_alpha == 0:
            self.lora_alpha = 2 * self.lora_r
        if self.lora_merge not in METHODS:
            raise ValueError(f"lora_merge must be one of {', '.join(METHODS)}, got {self.lora_merge!r}")
        for name in ("steps", "batch", "seq_len", "lora_r", "lora_alpha", "eval_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < MIN_SEQ_LEN:
            raise ValueError(
                f"seq_len must be >= {MIN_SEQ_LEN} (the shortest row a client trains on), got {self.seq_len}"
            )
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in 0..{MAX_SEED}, got {self.seed}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.deadline_s) and self.deadline_s >= 0):
            raise ValueError(f"deadline_s must be a finite number >= 0, got {self.deadline_s}")
        if self.codec:
            from fedge.quantization.codecs import LADDER, parse_codec

            auto, _, ceiling = self.codec.partition(":") if self.codec.startswith("auto") else ("", "", "")
            if auto and auto != "auto":
                raise ValueError(f"codec {self.codec!r}: expected auto or auto:CODEC")
            if auto and ceiling and ceiling not in LADDER:
                raise ValueError(f"codec {self.codec!r}: the ceiling after auto: must be one of {', '.join(LADDER)}")
            if not auto:
                parse_codec(self.codec)  # ValueError naming the bad part
        if self.plan:
            self.pinned_plan()  # ValueError naming what is wrong

    def pinned_plan(self):
        """The pinned `TrainingPlan` (None if there is none); ValueError if ``plan`` is not one."""
        if not self.plan:
            return None
        try:
            plan = TrainingPlan.from_dict(json.loads(self.plan))
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"plan: expected a training plan as JSON (a reply's plan record), got {err}") from None
        if not plan.feasible or plan.steps < 1:
            raise ValueError(f"plan: a pinned plan must be feasible with steps >= 1, got steps {plan.steps}")
        if plan.lora_r > self.lora_r or not set(plan.targets) <= set(self.targets):
            raise ValueError(f"plan: rank {plan.lora_r} / targets {list(plan.targets)} exceed the round's "
                             f"(lora_r {self.lora_r}, targets {list(self.targets)})")  # fmt: skip
        return plan

    def lora(self) -> LoraSettings:
        """The federation's LoRA adapter (a device's plan may train a part of it: `fedge.edge_client.planning.plan`)."""
        from fedge.common.modeling import LoraSettings

        return LoraSettings(
            r=self.lora_r, alpha=self.lora_alpha, target_modules=self.targets, freeze_a=self.lora_freeze_a
        )

    @property
    def targets(self) -> tuple[str, ...]:
        """``lora_targets`` as module names ("q_proj, v_proj" -> ("q_proj", "v_proj"))."""
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    def to_config(self) -> dict:
        """ConfigRecord contents (also the run config's round part): `fedge.common.settings.to_config`."""
        return to_config(self)

    @classmethod
    def from_config(cls, config) -> RoundSettings:
        """From a ConfigRecord (or dict); a missing key keeps its default."""
        return from_config(cls, config)

    def defining(self) -> dict:
        """The settings a resumed federation must keep: they fix the adapter's tensors."""
        return {
            "model": self.model,
            "lora_r": self.lora_r,
            "lora_alpha": self.lora_alpha,
            "lora_targets": self.lora_targets,
            "seed": self.seed,
            "lora_freeze_a": self.lora_freeze_a,
        }
