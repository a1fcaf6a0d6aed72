"""Update codecs: encode/decode pairs for adapter deltas, composable (error feedback: `updates.py`). Plain numpy.

A codec spec is ``"none"``, ``"fp16"``, ``"int8"``, ``"int4"``, ``"int3"``, ``"int2"`` or ``"topk:F+VALUES"``
(``F`` in (0, 1], ``VALUES`` one of the others), e.g. ``"topk:0.1+int8"``; ``int8:128`` / ``int4:32`` set the
block size (default 64, a multiple of 8).

- ``int8`` / ``int4`` / ``int3`` / ``int2``: blockwise absmax quantization. Each block of ``block`` values gets one
  fp16 scale, relative to an fp32 scale per tensor (so tiny deltas never underflow fp16). int8 is symmetric (-127..127),
  int4/int3/int2 split [-absmax, absmax] into 2^bits equal cells, each decoded to its centre (the least-error
  uniform quantizer for flat data), packed two / four per byte (int3 as a little-endian bit stream). int3 is
  the densest code under 1/8 of fp32 that keeps the error near int4's: 3.25 bits per value with its scales. Adam-trained
  LoRA deltas are nearly flat (kurtosis ~2, measured), so int2 loses far less than top-k at the same size.
- ``mix:F+int4`` (or ``mix:F+int3``): a fraction ``F`` of the values at the value codec's bits, the rest one bit
  fewer (int3, or int2). The finer code goes to the tensors whose coarse coding would add the most squared error
  (the largest mean block scale), whole tensors at a time. ``mix:0.9+int4:256`` averages 3.96 bits a value: under
  1/8 of fp32 with its scales, at about half int3's error on real LoRA deltas.
- ``topk:F``: per tensor, keeps the ``ceil(F * n)`` largest-magnitude entries; their indices travel as a bitmap
  (1 bit per entry) or as uint16 gaps or uint32 positions, whichever is smallest; the kept values go through
  the value codec.

The encoded form (:class:`Encoded`) is a handful of flat arrays, every tensor's parts concatenated (an
ArrayRecord pays ~128 bytes of npy header per array, so 210 tensors x 3 parts would cost ~80 kB), plus a
JSON-able header with the spec and each tensor's name, shape and dtype. :meth:`Encoded.to_arrays` puts the header
in the arrays too (zlib-compressed JSON), so one ArrayRecord carries everything.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

Arrays = dict[str, np.ndarray]
FORMAT = 1
HEADER_KEY = "codec-header"  # the array holding the zlib-compressed JSON header in Encoded.to_arrays()
VALUE_CODECS = ("none", "fp16", "int8", "int4", "int3", "int2")
BITS = {"int8": 8, "int4": 4, "int3": 3, "int2": 2}  # the blockwise quantized value codecs
DEFAULT_BLOCK = 64
MAX_HEADER_BYTES = 1 << 20  # decompressed JSON header: ~100 bytes a tensor, so thousands of tensors fit
MAX_TENSORS = 100_000
_FLOAT_DTYPES = ("float16", "float32", "float64")
# Least lossy first (ordered by measured error on real LoRA-B deltas, benchmarks/codecs.py).
LADDER = (
    "none",
    "fp16",
    "int8",
    "int4",
    "mix:0.9+int4:256",
    "int3",
    "int2",
    "topk:0.25+int2",
    "topk:0.1+int2",
    "topk:0.05+int2",
    "topk:0.02+int2",
    "topk:0.01+int2",
)
_INDEX_MODES = ("bitmap", "u16", "u32")


@dataclass(frozen=True)
class Codec:
    """A parsed codec spec: optional top-k sparsification or bit mixing, then a value codec."""

    values: str = "none"  # one of VALUE_CODECS
    topk: float | None = None  # fraction of entries kept per tensor, in (0, 1]
    block: int = DEFAULT_BLOCK  # values per scale, int8/int4/int2 only
    mix: float | None = None  # fraction of values at ``values``' bits, the rest at one bit fewer (int4/int3 only)

    @property
    def spec(self) -> str:
        """The canonical spec string (parses back to an equal Codec)."""
        value = self.values + (f":{self.block}" if self.values in BITS and self.block != DEFAULT_BLOCK else "")
        if self.mix is not None:
            return f"mix:{self.mix:g}+{value}"
        return value if self.topk is None else f"topk:{self.topk:g}+{value}"

    def encode(self, arrays: Mapping[str, np.ndarray]) -> Encoded:
        """Encode float arrays (any shapes); raises ValueError naming a tensor with NaN/Inf or a non-float dtype."""
        tensors, parts = [], _Parts()
        modes, flats = [], {}
        for name, a in arrays.items():
            a = np.asarray(a)
            if a.dtype.kind != "f":
                raise ValueError(f"tensor {name}: codecs encode float arrays, got {a.dtype}")
            flat = a.astype(np.float32, copy=False).ravel()  # (n,)
            if not np.isfinite(flat).all():
                raise ValueError(f"tensor {name}: non-finite values (NaN or Inf) cannot be encoded")
            tensors.append([name, list(a.shape), str(a.dtype)])
            flats[name] = flat
        kinds = _mix_kinds(flats, self) if self.mix is not None else {}
        for name, flat in flats.items():
            if self.topk is not None:
                flat, mode = _sparsify(flat, _kept(self.topk, flat.size), parts)
                modes.append(mode)
            _encode_values(name, flat, self, parts, kinds.get(name, self.values))
        header = {"format": FORMAT, "codec": self.spec, "tensors": tensors}
        if self.topk is not None:
            header["index"] = modes
        if self.mix is not None:
            header["bits"] = [BITS[kinds[name]] for name in flats]
        return Encoded(header, parts.finish(self))

    def decode(self, encoded: Encoded, shapes: Mapping[str, tuple[int, ...]] | None = None) -> Arrays:
        """Decode; with ``shapes`` (e.g. the global adapter's), every tensor must be one of them, same shape.

        Raises ValueError naming the tensor for a shape mismatch, a truncated or oversized payload, bad indices.
        """
        if encoded.header.get("codec") != self.spec:
            raise ValueError(f"payload was encoded with {encoded.header.get('codec')!r}, not {self.spec!r}")
        return decode(encoded, shapes)


# The stages that come before the value codec: (interval's opening bracket, example, lower bound, why first).
_FIRST_STAGES = {
    "mix": ("[", "mix:0.9+int4", 0.0, "it says how many values the value codec codes finer"),
    "topk": ("(", "topk:0.1", 0.0, "it picks entries, the value codec encodes them"),
}


def parse_codec(spec: str) -> Codec:
    """``"topk:0.1+int8"`` -> Codec; ValueError naming the bad part of the spec."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"codec spec must be a non-empty string, got {spec!r}")
    stages = [s.strip() for s in spec.strip().lower().split("+")]
    fractions: dict[str, float] = {}  # the first stage's fraction, by its name (topk or mix)
    values, block = None, DEFAULT_BLOCK
    for i, stage in enumerate(stages):
        name, _, arg = stage.partition(":")
        bad = f"codec spec {spec!r}: {stage!r}"
        if name in _FIRST_STAGES:
            bracket, example, low, why = _FIRST_STAGES[name]
            if i != 0:
                raise ValueError(f"{bad}: {name} must come first ({why})")
            try:
                value = float(arg)
            except ValueError:
                raise ValueError(f"{bad}: expected {name}:FRACTION, e.g. {example}") from None
            if not (low <= value if bracket == "[" else low < value) or value > 1:
                raise ValueError(f"{bad}: the fraction must be in {bracket}{low:g}, 1], got {value:g}")
            fractions[name] = value
        elif name in VALUE_CODECS:
            if values is not None:
                raise ValueError(f"{bad}: at most one value codec ({', '.join(VALUE_CODECS)}) per spec")
            values = name
            if arg:
                if name not in BITS:
                    raise ValueError(f"{bad}: only {', '.join(BITS)} take a block size")
                if not arg.isdigit() or int(arg) < 8 or int(arg) % 8:
                    raise ValueError(f"{bad}: the block size must be a multiple of 8, got {arg!r}")
                block = int(arg)
        else:
            raise ValueError(f"{bad}: unknown codec; known: topk:F, mix:F, {', '.join(VALUE_CODECS)}")
    mix, topk = fractions.get("mix"), fractions.get("topk")
    if mix is not None and values not in _COARSER:
        raise ValueError(f"codec spec {spec!r}: mix takes {' or '.join(_COARSER)} (the rest one bit fewer)")
    return Codec(values=values or "none", topk=topk, block=block, mix=mix)


@dataclass
class Encoded:
    """An encoded update: ``arrays`` (a few flat arrays, all tensors concatenated) and a JSON-able ``header``.

    ``header``: ``{"format": 1, "codec": spec, "tensors": [[name, shape, dtype], ...], "index": [mode, ...]}``.
    """

    header: dict
    arrays: Arrays = field(default_factory=dict)

    def to_arrays(self) -> Arrays:
        """Everything as one flat dict of arrays (the header as zlib-compressed JSON bytes): fits an ArrayRecord."""
        blob = zlib.compress(json.dumps(self.header, separators=(",", ":")).encode(), 9)
        return {HEADER_KEY: np.frombuffer(blob, dtype=np.uint8), **self.arrays}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> Encoded:
        """Inverse of :meth:`to_arrays`; ValueError if the header is missing, unreadable or not a codec header.

        The header may come from anyone: it is decompressed to at most ``MAX_HEADER_BYTES`` and its structure (a
        dict whose ``tensors`` are ``[name, shape, float dtype]`` entries, at most ``MAX_TENSORS``) is checked
        before anything reads it.
        """
        if HEADER_KEY not in arrays:
            raise ValueError(f"not an encoded update: no {HEADER_KEY!r} array (was it sent with a codec?)")
        try:
            inflate = zlib.decompressobj()
            text = inflate.decompress(np.asarray(arrays[HEADER_KEY], dtype=np.uint8).tobytes(), MAX_HEADER_BYTES)
            if inflate.unconsumed_tail:
                raise ValueError(f"larger than {MAX_HEADER_BYTES} bytes decompressed")
            header = json.loads(text)
        except (zlib.error, ValueError, RecursionError) as e:
            raise ValueError(f"unreadable codec header: {e}") from None
        if not isinstance(header, dict):
            raise ValueError(f"codec header: expected a JSON object, got {type(header).__name__}")
        tensors = header.get("tensors")
        if not isinstance(tensors, list) or len(tensors) > MAX_TENSORS:
            raise ValueError(f"codec header: 'tensors' must be a list of at most {MAX_TENSORS} entries")
        for entry in tensors:
            _tensor_entry(entry)
        for key in ("index", "bits"):
            if key in header and not isinstance(header[key], list):
                raise ValueError(f"codec header: {key!r} must be a list")
        return cls(header, {k: np.asarray(v) for k, v in arrays.items() if k != HEADER_KEY})

    def tensors(self) -> list[tuple[str, tuple[int, ...], str]]:
        """The header's (name, shape, dtype) entries (checked by `from_arrays`)."""
        return [_tensor_entry(e) for e in self.header.get("tensors", [])]

    def encoded_bytes(self) -> int:
        """Payload bytes: every array's data plus the compressed header (not counting ~128 B npy header/array)."""
        return sum(a.nbytes for a in self.to_arrays().values())

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.tensors()]


def encode(arrays: Mapping[str, np.ndarray], spec: str | Codec) -> Encoded:
    """Encode ``arrays`` with ``spec`` (a string or a parsed Codec)."""
    return (parse_codec(spec) if isinstance(spec, str) else spec).encode(arrays)


def decode(encoded: Encoded, shapes: Mapping[str, tuple[int, ...]] | None = None) -> Arrays:
    """Decode an :class:`Encoded` to float arrays of their original shapes and dtypes (codec from its header).

    With ``shapes`` (name -> shape, e.g. of the global adapter) every tensor must be there with that shape.
    ValueError naming the tensor for: unknown codec, shape mismatch, truncated or oversized payload, bad indices.
    """
    header = encoded.header
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(
            f"unknown codec header format {header.get('format') if isinstance(header, dict) else header!r}"
        )
    codec = parse_codec(str(header.get("codec")))
    tensors = header.get("tensors")
    modes = header.get("index", [])
    bits = header.get("bits", [])
    if not isinstance(tensors, list) or (codec.topk is not None and len(modes) != len(tensors)):
        raise ValueError("codec header: 'tensors' (and 'index' for topk) must be lists of the same length")
    if codec.mix is not None:
        kinds = {BITS[codec.values]: codec.values, BITS[_COARSER[codec.values]]: _COARSER[codec.values]}
        if (
            not isinstance(bits, list)
            or len(bits) != len(tensors)
            or any(not isinstance(b, int) or b not in kinds for b in bits)
        ):
            raise ValueError(f"codec header: 'bits' must give each tensor's bits, one of {sorted(kinds)}")
    reader = _Reader(encoded.arrays, codec)
    out: Arrays = {}
    for i, entry in enumerate(tensors):
        name, shape, dtype = _tensor_entry(entry)
        if shapes is not None:
            if name not in shapes:
                raise ValueError(f"tensor {name}: not in the adapter")
            if tuple(shapes[name]) != shape:
                raise ValueError(f"tensor {name}: shape {shape}, expected {tuple(shapes[name])}")
        n = math.prod(shape)
        kind = kinds[bits[i]] if codec.mix is not None else codec.values
        if codec.topk is None:
            flat = reader.values(name, n, kind)
        else:
            k = _kept(codec.topk, n)
            index = reader.index(name, str(modes[i]), n, k)
            flat = np.zeros(n, dtype=np.float32)
            flat[index] = reader.values(name, k)
        out[name] = flat.reshape(shape).astype(dtype, copy=False)
    reader.check_consumed()
    return out


# --- internals ------------------------------------------------------------------------------------------------


def _kept(fraction: float, n: int) -> int:
    return min(n, max(1, math.ceil(fraction * n))) if n else 0


def _tensor_entry(entry) -> tuple[str, tuple[int, ...], str]:
    """A header's ``[name, shape, dtype]``: a name, at most 8 dims of 0..2**31-1 (ints, not floats or bools), and
    a float dtype; ValueError otherwise (a short excerpt of the entry, never the whole of a hostile one)."""
    ok = isinstance(entry, list) and len(entry) == 3
    if ok:
        name, shape, dtype = entry
        ok = isinstance(name, str) and len(name) <= 512 and isinstance(shape, list) and len(shape) <= 8
        ok = ok and all(type(d) is int and 0 <= d < 2**31 for d in shape) and dtype in _FLOAT_DTYPES
    if not ok:
        raise ValueError(f"codec header: bad tensor entry {str(entry)[:80]!r} (expected [name, shape, float dtype])")
    return name, tuple(shape), dtype


class _Parts:
    """Per-tensor parts being concatenated into the payload's few arrays."""

    def __init__(self) -> None:
        self.chunks: dict[str, list[np.ndarray]] = {}

    def add(self, key: str, a: np.ndarray) -> None:
        self.chunks.setdefault(key, []).append(a)

    def finish(self, codec: Codec) -> Arrays:
        dtypes = {"index": np.uint8, "values": _VALUE_DTYPE.get(codec.values, np.uint8), "scale": np.float16,
                  "tscale": np.float32}  # fmt: skip
        keys = ["values"] + (["scale", "tscale"] if codec.values in BITS else [])
        keys = (["index"] if codec.topk is not None else []) + keys
        return {k: np.concatenate(self.chunks[k]) if self.chunks.get(k) else np.zeros(0, dtypes[k]) for k in keys}


_VALUE_DTYPE = {"none": np.float32, "fp16": np.float16, "int8": np.int8}
_VALUE_DTYPE |= dict.fromkeys(("int4", "int3", "int2"), np.uint8)  # packed codes


def _sparsify(flat: np.ndarray, k: int, parts: _Parts) -> tuple[np.ndarray, str]:
    """Keep the k largest |entries|: adds their index bytes to ``parts``, returns (kept values (k,), index mode)."""
    n = flat.size
    if k >= n:
        index = np.arange(n)
    else:
        index = np.sort(np.argpartition(np.abs(flat), n - k)[n - k :])  # (k,) ascending
    gaps = np.diff(index, prepend=0)
    sizes = {"bitmap": (n + 7) // 8, "u16": 2 * k if k == 0 or gaps.max() < 65536 else None, "u32": 4 * k}
    mode = min((m for m in _INDEX_MODES if sizes[m] is not None), key=lambda m: sizes[m])
    if mode == "bitmap":
        bits = np.zeros(n, dtype=bool)
        bits[index] = True
        parts.add("index", np.packbits(bits))
    elif mode == "u16":
        parts.add("index", gaps.astype("<u2").view(np.uint8))
    else:
        parts.add("index", index.astype("<u4").view(np.uint8))
    return flat[index], mode


_COARSER = {"int4": "int3", "int3": "int2"}  # mix: the rest's code (packed codes too, so one values array)


def _mix_kinds(flats: Mapping[str, np.ndarray], codec: Codec) -> dict[str, str]:
    """Each tensor's code under ``mix:F``: the finer one for the tensors whose coarser coding would add the most
    squared error per value (it grows with the square of the block scales), up to ``F`` of all values."""
    fine, coarse = codec.values, _COARSER[codec.values]
    block = codec.block

    def cost(flat: np.ndarray) -> float:  # mean squared block absmax: the quantization step squared, up to a factor
        if not flat.size:
            return 0.0
        padded = np.zeros(-(-flat.size // block) * block, np.float32)
        padded[: flat.size] = np.abs(flat)
        return float(np.mean(padded.reshape(-1, block).max(axis=1).astype(np.float64) ** 2))

    allowed = codec.mix * sum(f.size for f in flats.values())
    kinds, used = {}, 0
    for name in sorted(flats, key=lambda k: -cost(flats[k])):
        size = flats[name].size
        kinds[name] = fine if used + size <= allowed else coarse
        used += size if kinds[name] == fine else 0
    return kinds


def _encode_values(name: str, flat: np.ndarray, codec: Codec, parts: _Parts, kind: str | None = None) -> None:
    """Add ``flat``'s values to ``parts`` in ``kind`` (default: the codec's value codec)."""
    kind = kind or codec.values
    if kind == "none":
        parts.add("values", flat.astype(np.float32))
    elif kind == "fp16":
        if flat.size and np.abs(flat).max() > np.finfo(np.float16).max:
            raise ValueError(f"tensor {name}: values beyond fp16's range (65504); use int8 or none")
        parts.add("values", flat.astype(np.float16))
    else:
        q, scale, tscale = _quantize(flat, kind, codec.block)
        parts.add("values", q)
        parts.add("scale", scale)
        parts.add("tscale", tscale)


def _levels(kind: str) -> float:
    """absmax in steps: int8 is symmetric (+-127 steps); int4/int2 split [-absmax, absmax] into 2^bits cells."""
    return 127.0 if kind == "int8" else float(2 ** (BITS[kind] - 1))


def _quantize(flat: np.ndarray, kind: str, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blockwise absmax: (int8 values or packed uint8 codes, fp16 block scales (nb,), fp32 tensor scale (1,))."""
    nb = -(-flat.size // block)
    x = np.zeros(nb * block, dtype=np.float32)
    x[: flat.size] = flat
    x = x.reshape(nb, block)  # (blocks, block)
    absmax = np.abs(x).max(axis=1) if nb else np.zeros(0, np.float32)  # (blocks,)
    tmax = np.float32(absmax.max()) if nb else np.float32(0)
    rel = (absmax / tmax if tmax > 0 else absmax).astype(np.float16)  # (blocks,) in [0, 1]
    step = (tmax * rel.astype(np.float32) / _levels(kind))[:, None]  # (blocks, 1): the scale the decoder will use
    y = np.divide(x, step, out=np.zeros_like(x), where=step > 0)
    if kind == "int8":
        return np.clip(np.rint(y), -127, 127).astype(np.int8).ravel(), rel, np.array([tmax], np.float32)
    bits = BITS[kind]
    half = 2 ** (bits - 1)  # code j stands for (j - half + 0.5) steps
    codes = np.clip(np.floor(y + half), 0, 2 * half - 1).astype(np.uint8).ravel()
    return _pack(codes, bits), rel, np.array([tmax], np.float32)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """``bits``-bit codes -> bytes. 8 % bits == 0: codes side by side in a byte, value 0 in the low bits;
    otherwise (int3) a bit stream of each code's bits, low bit first (blocks are multiples of 8 values)."""
    if 8 % bits == 0:
        per_byte = codes.reshape(-1, 8 // bits)
        packed = np.zeros(per_byte.shape[0], dtype=np.uint8)
        for j in range(per_byte.shape[1]):
            packed |= per_byte[:, j] << (bits * j)
        return packed
    planes = (codes[:, None] >> np.arange(bits, dtype=np.uint8)) & 1  # (n, bits)
    return np.packbits(planes.ravel(), bitorder="little")


def _unpack(q: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`_pack`: (n,) uint8 codes."""
    if 8 % bits == 0:
        mask = np.uint8(2**bits - 1)
        return np.stack([(q >> (bits * j)) & mask for j in range(8 // bits)], axis=1).ravel()[:n]
    planes = np.unpackbits(q, count=n * bits, bitorder="little").reshape(n, bits)
    return (planes << np.arange(bits, dtype=np.uint8)).sum(axis=1, dtype=np.uint8)


def _dequantize(q: np.ndarray, rel: np.ndarray, tmax: float, kind: str, block: int, n: int) -> np.ndarray:
    step = (np.float32(tmax) * rel.astype(np.float32) / _levels(kind))[:, None]  # (blocks, 1)
    if kind == "int8":
        y = q.astype(np.float32)
    else:
        bits = BITS[kind]
        codes = _unpack(q, bits, rel.size * block)
        y = codes.astype(np.float32) - (2 ** (bits - 1) - 0.5)
    y = y.reshape(-1, block) * step  # (blocks, block)
    return y.ravel()[:n]


class _Reader:
    """Walks the payload arrays tensor by tensor; every shortfall names the tensor."""

    def __init__(self, arrays: Mapping[str, np.ndarray], codec: Codec) -> None:
        self.codec = codec
        want = {"values": _VALUE_DTYPE[codec.values]}
        if codec.values in BITS:
            want |= {"scale": np.float16, "tscale": np.float32}
        if codec.topk is not None:
            want["index"] = np.uint8
        self.arrays, self.pos = {}, {}
        for key, dtype in want.items():
            if key not in arrays:
                raise ValueError(f"codec {codec.spec}: payload has no {key!r} array")
            a = np.asarray(arrays[key])
            if a.dtype != dtype or a.ndim != 1:
                raise ValueError(f"codec {codec.spec}: {key!r} must be 1-d {np.dtype(dtype)}, got {a.ndim}-d {a.dtype}")
            self.arrays[key], self.pos[key] = a, 0

    def take(self, key: str, count: int, name: str) -> np.ndarray:
        a, start = self.arrays[key], self.pos[key]
        if start + count > a.size:
            raise ValueError(
                f"tensor {name}: payload truncated ({key!r} has {a.size - start} entries left, needs {count})"
            )
        self.pos[key] = start + count
        return a[start : start + count]

    def values(self, name: str, n: int, kind: str | None = None) -> np.ndarray:
        c, kind = self.codec, kind or self.codec.values
        if kind in ("none", "fp16"):
            return self.take("values", n, name).astype(np.float32)
        nb = -(-n // c.block)
        q = self.take("values", nb * c.block * BITS[kind] // 8, name)
        rel = self.take("scale", nb, name)
        tmax = float(self.take("tscale", 1, name)[0])
        return _dequantize(q, rel, tmax, kind, c.block, n)

    def index(self, name: str, mode: str, n: int, k: int) -> np.ndarray:
        if mode == "bitmap":
            bits = np.unpackbits(self.take("index", (n + 7) // 8, name), count=n).astype(bool)
            index = np.flatnonzero(bits)
        elif mode == "u16":
            index = np.cumsum(self.take("index", 2 * k, name).view("<u2").astype(np.int64))
        elif mode == "u32":
            index = self.take("index", 4 * k, name).view("<u4").astype(np.int64)
        else:
            raise ValueError(f"tensor {name}: unknown index mode {mode!r}")
        if index.size != k or (k and (index[-1] >= n or np.any(np.diff(index) <= 0))):
            raise ValueError(f"tensor {name}: bad top-k indices (need {k} increasing positions below {n})")
        return index

    def check_consumed(self) -> None:
        for key, a in self.arrays.items():
            if self.pos[key] != a.size:
                raise ValueError(
                    f"codec {self.codec.spec}: {a.size - self.pos[key]} unexpected extra entries in {key!r}"
                )
