"""What a client sends up: its change to the global adapter, encoded (`fedge.quantization.codecs`) with error
feedback, by a codec its link can afford in the time left. Plain numpy.
"""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedge.quantization.codecs import BITS, LADDER, Codec, Encoded, decode, encode, parse_codec

Arrays = dict[str, np.ndarray]


# --- error feedback -------------------------------------------------------------------------------------------


class ErrorFeedback:
    """Per-tensor residual of what the codec dropped, kept on the device across rounds (EF-SGD, Karimireddy 2019).

    ``encode(delta)`` sends ``codec(delta + residual)`` and keeps ``(delta + residual) - decoded`` as the new
    residual, so what is dropped in one round is sent later: the sum of decoded updates tracks the sum of deltas
    within one residual. Tensors absent from a round's delta keep their residual; a tensor whose shape changed
    (a new LoRA rank) starts from a zero residual.
    """

    def __init__(self, codec: str | Codec, residual: Arrays | None = None) -> None:
        self.codec = parse_codec(codec) if isinstance(codec, str) else codec
        self.residual: Arrays = dict(residual or {})

    def encode(self, delta: Mapping[str, np.ndarray]) -> Encoded:
        """Encode ``delta + residual`` and update the residual; the returned payload is what to send."""
        target = {}
        for name, d in delta.items():
            d = np.asarray(d, dtype=np.float32)
            r = self.residual.get(name)
            target[name] = d + r if r is not None and r.shape == d.shape else d.copy()
        encoded = self.codec.encode(target)
        decoded = decode(encoded)
        for name, t in target.items():
            self.residual[name] = t - decoded[name]
        return encoded

    def residual_norm(self) -> float:
        """L2 norm of the residual over all tensors."""
        return float(np.sqrt(sum(float(np.sum(r.astype(np.float64) ** 2)) for r in self.residual.values())))

    def to_bytes(self) -> bytes:
        """The residual and the codec spec as .npz bytes, for :meth:`load` (write them atomically)."""
        buf = io.BytesIO()
        np.savez(buf, **{f"r/{k}": v for k, v in self.residual.items()}, codec=np.array(self.codec.spec))
        return buf.getvalue()

    @classmethod
    def load(cls, path: Path, codec: str | Codec | None = None) -> ErrorFeedback:
        """Read a residual written from :meth:`to_bytes`; ``codec`` overrides the saved spec (the residual stays valid).

        A missing file gives an empty residual; an unreadable one raises ValueError naming the file.
        """
        path = Path(path)
        if not path.is_file():
            return cls(codec or "none")
        try:
            with np.load(path, allow_pickle=False) as data:
                saved = str(data["codec"])
                residual = {k[2:]: data[k] for k in data.files if k.startswith("r/")}
        except (OSError, ValueError, KeyError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: not a residual file saved by ErrorFeedback ({e})") from None
        return cls(codec or saved, residual)


# --- measurement and choice -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodecError:
    """One codec measured on some arrays."""

    spec: str
    rel_error: float  # ||decoded - x|| / ||x|| over all tensors (L2)
    encoded_bytes: int
    ratio: float  # encoded bytes / fp32 bytes of the same arrays


def measure(arrays: Mapping[str, np.ndarray], specs: list[str]) -> list[CodecError]:
    """Relative L2 error and compression ratio (vs fp32) of each codec on ``arrays`` (one shot, no feedback)."""
    fp32 = sum(np.asarray(a).size * 4 for a in arrays.values())
    norm = math.sqrt(sum(float(np.sum(np.asarray(a, dtype=np.float64) ** 2)) for a in arrays.values()))
    out = []
    for spec in specs:
        enc = encode(arrays, spec)
        dec = decode(enc)
        err = math.sqrt(sum(float(np.sum((dec[k].astype(np.float64) - arrays[k]) ** 2)) for k in arrays))
        out.append(CodecError(spec, err / max(norm, 1e-30), enc.encoded_bytes(), enc.encoded_bytes() / max(fp32, 1)))
    return out


def estimate_bytes(spec: str | Codec, fp32_bytes: int) -> int:
    """Payload bytes of ``spec`` for an update of ``fp32_bytes`` (as float32), without the data.

    Ignores per-tensor padding to whole blocks and the header (a few kB for 210 tensors): within ~1% here.
    """
    codec = parse_codec(spec) if isinstance(spec, str) else spec
    n = fp32_bytes / 4
    value_bits = float({"none": 32, "fp16": 16, **BITS}[codec.values])
    if codec.mix is not None:
        value_bits -= 1 - codec.mix  # the coarser rest
    if codec.values in BITS:
        value_bits += 16 / codec.block
    if codec.topk is None:
        return math.ceil(n * value_bits / 8)
    index_bits = min(1.0, 16 * codec.topk)  # bitmap or uint16 gaps
    return math.ceil(n * (codec.topk * value_bits + index_bits) / 8)


def pick_codec(fp32_bytes: int, uplink_bytes_per_s: float, budget_s: float, ladder: tuple[str, ...] = LADDER) -> str:
    """The least lossy spec of ``ladder`` whose payload uploads within ``budget_s`` at ``uplink_bytes_per_s``.

    If none fits, the last (smallest) one: the upload then misses the budget by the least.
    """
    if not ladder:
        raise ValueError("the codec ladder is empty")
    allowed = max(0.0, uplink_bytes_per_s) * max(0.0, budget_s)
    for spec in ladder:
        if estimate_bytes(spec, fp32_bytes) <= allowed:
            return spec
    return ladder[-1]


def make_delta(trained: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> Arrays:
    """``trained - reference`` (float32) for the tensors that changed; unchanged ones (frozen LoRA A) are left out."""
    return {
        k: (np.asarray(v, dtype=np.float32) - reference[k]).astype(np.float32)
        for k, v in trained.items()
        if not np.array_equal(v, reference[k])
    }


def apply_delta(reference: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> Arrays:
    """``reference + delta``, tensors absent from ``delta`` unchanged; ValueError for an unknown tensor."""
    extra = sorted(set(delta) - set(reference))
    if extra:
        raise ValueError(f"delta has tensors the adapter lacks: {extra[:3]}")
    return {k: (v + delta[k]).astype(v.dtype) if k in delta else v.copy() for k, v in reference.items()}
