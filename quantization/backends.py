"""Pick a device, a compute dtype and a base-weight precision, and load a frozen base model with it.

Precisions (`PRECISIONS`):
  fp32, bf16, fp16   plain weights in that dtype.
  int8, int4         the portable torch-only path (`fedge.quantization.portable`): runs wherever torch runs.
  bnb-int8, bnb-nf4  bitsandbytes (`pip install 'fedge[bnb]'`); may be missing or broken on ARM boards.
  auto               bf16 where bf16 matmuls are fast (see `compute_dtype_for`), else fp32.

Rule for "auto": it never quantizes, because quantization trades accuracy for memory and only the
caller knows the memory budget (the device profile decides that). It picks bf16 only where the hardware
runs bf16 natively (CUDA with bf16, CPUs with AMX-BF16 or AVX512-BF16, ARM with the BF16 extension);
elsewhere bf16 is emulated and slower than fp32. fp16 is never picked automatically: fp16 activations
can overflow while training, so it must be asked for.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fedge.quantization import PRECISIONS
from fedge.quantization.portable import quantize_linears_

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "PRECISIONS",
    "BackendUnavailable",
    "LoadedModel",
    "compute_dtype_for",
    "cpu_supports_bf16",
    "is_bitsandbytes_available",
    "load_base_model",
    "pick_device",
    "resolve_precision",
]

log = logging.getLogger(__name__)


_FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_BNB_INSTALL_HINT = "install it with `pip install 'fedge[bnb]'`, or use the portable precision 'int4' or 'int8'"


class BackendUnavailable(ValueError):
    """A requested precision needs a backend that is missing or does not work on this device."""


# --- hardware probes ---------------------------------------------------------------------------


def cpu_supports_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU runs bf16 matmuls natively: x86 AMX-BF16 / AVX512-BF16, or ARM's BF16 feature.

    `cpuinfo` is the text of /proc/cpuinfo (read when None; tests pass fixture text). Reads the
    `flags` lines (x86) and `Features` lines (aarch64). Returns False when the file is absent (macOS).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return bool(flags & {"amx_bf16", "avx512_bf16", "bf16"})


def pick_device(preference: str = "auto") -> torch.device:
    """The torch device to train on: `preference` if not "auto", else cuda, then mps, then cpu.

    Raises ValueError when a named device is not available here.
    """
    if preference != "auto":
        device = torch.device(preference)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {preference!r} requested but CUDA is not available")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {preference!r} requested but MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def compute_dtype_for(device: torch.device, cpuinfo: str | None = None) -> torch.dtype:
    """The fastest safe dtype for matmuls on `device`.

    bf16 on CUDA with bf16 support and on CPUs with native bf16 (`cpu_supports_bf16`), fp16 on MPS and
    older CUDA (their fast path), fp32 otherwise (e.g. Raspberry Pi: bf16 is emulated there).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_supports_bf16(cpuinfo) else torch.float32


@functools.cache
def _bitsandbytes_error(device_type: str) -> str | None:
    """None when bitsandbytes can quantize and matmul a tiny nf4 weight on `device_type`, else why not."""
    try:
        import bitsandbytes as bnb  # optional backend: imported only when asked for

        w = torch.randn(64, 64, device=device_type)
        packed, state = bnb.functional.quantize_4bit(w, quant_type="nf4")
        x = torch.randn(2, 64, device=device_type)
        y = bnb.matmul_4bit(x, packed.t(), quant_state=state)
        if y.shape != (2, 64) or not torch.isfinite(y).all():
            return "bitsandbytes returned a wrong result for a test matmul"
    except Exception as exc:  # ImportError or a broken native library: both mean "no"
        return f"{type(exc).__name__}: {exc}"
    return None


def is_bitsandbytes_available(device: torch.device | str = "cpu") -> bool:
    """True when bitsandbytes is installed and really works on `device` (cached per device type).

    Runs a 64x64 nf4 quantize + matmul rather than trusting the import: bitsandbytes wheels can import
    on ARM boards and then fail in their native library.
    """
    return _bitsandbytes_error(torch.device(device).type) is None


# --- precision resolution ----------------------------------------------------------------------


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn a user-facing precision into a concrete one for `device` (see the module docstring for "auto").

    Raises ValueError for an unknown name (listing the valid ones) and BackendUnavailable when a
    bnb-* precision is asked for and bitsandbytes does not work on this device.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if compute_dtype_for(device) == torch.bfloat16 else "fp32"
    if precision.startswith("bnb-"):
        error = _bitsandbytes_error(torch.device(device).type)
        if error is not None:
            raise BackendUnavailable(
                f"precision {precision!r} needs a working bitsandbytes on {torch.device(device).type} "
                f"({error}); {_BNB_INSTALL_HINT}"
            )
    return precision


# --- loading -----------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A frozen base model and what the training loop needs to know about it.

    `precision` is the resolved precision (never "auto"); `compute_dtype` is the dtype activations and
    non-quantized weights use (feed inputs and autocast in it); `device` is where the weights live.
    """

    model: PreTrainedModel
    precision: str
    compute_dtype: torch.dtype
    device: torch.device

    @property
    def weight_bytes(self) -> int:
        """Bytes held by the model's parameters and buffers (packed bytes for quantized weights)."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)


def load_base_model(
    model_dir: Path,
    precision: str,
    device: torch.device,
    *,
    group_size: int = 32,
    double_quant: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> LoadedModel:
    """Load the causal LM in `model_dir` (an HF directory) frozen, in eval mode, at `precision`.

    fp32/bf16/fp16 load in that dtype. int8/int4 load in the checkpoint's dtype, then quantize each
    Linear in place (`group_size` for int4) and cast lm_head, embeddings and norms to the compute dtype.
    bnb-int8/bnb-nf4 load through `BitsAndBytesConfig` (nf4 computes in the compute dtype;
    `double_quant` also quantizes its scales, saving ~0.4 bit per weight).
    Peak memory: fp32/bf16/fp16 hold one copy in that dtype (none extra when it matches the file's
    dtype: the file is mapped). int8/int4 add the quantized model plus one Linear's temporaries to the
    mapped file. Mapped file pages count in RSS but are page cache the OS can drop under pressure.
    `compute_dtype` overrides the device's compute dtype for the quantized paths (e.g. fp32 compute over
    int4 weights: slower, but no bf16 rounding in the activations).
    Raises ValueError / BackendUnavailable as `resolve_precision` does, OSError for a bad directory.
    """
    from transformers import AutoModelForCausalLM  # lazy: keeps `import quantization` light

    device = torch.device(device)
    resolved = resolve_precision(precision, device)
    compute_dtype = _FLOAT_DTYPES.get(resolved) or compute_dtype or compute_dtype_for(device)
    # The portable int paths load in the checkpoint's own dtype ("auto"): transformers then maps the
    # safetensors file instead of converting it, so the float weights are reclaimable file pages and
    # only the quantized copies are new memory. Measured on SmolLM2-135M (fp32 file): +69 MB anonymous
    # peak this way, against +330 MB when loading as bf16 first.
    load_dtype = "auto" if resolved in ("int8", "int4") else compute_dtype
    kwargs: dict[str, object] = {"dtype": load_dtype}
    if device.type != "cpu":
        kwargs["device_map"] = {"": device}  # load straight onto the accelerator, not via host RAM
    if resolved.startswith("bnb-"):
        kwargs["quantization_config"] = _bnb_config(resolved, compute_dtype, double_quant)
        kwargs["device_map"] = {"": device}  # bitsandbytes quantizes while placing weights
    model = AutoModelForCausalLM.from_pretrained(Path(model_dir), **kwargs)
    if resolved in ("int8", "int4"):
        bits = 8 if resolved == "int8" else 4
        quantize_linears_(model, bits, group_size=group_size, compute_dtype=compute_dtype)
        _return_freed_memory_to_os()
    model.requires_grad_(False)
    model.eval()
    log.info("loaded %s at %s on %s (compute %s)", model_dir, resolved, device, compute_dtype)
    return LoadedModel(model=model, precision=resolved, compute_dtype=compute_dtype, device=device)


def _return_freed_memory_to_os() -> None:
    """Ask glibc to give freed heap pages back to the OS; a no-op elsewhere (macOS, musl, Windows).

    Quantizing frees the float weights one by one, but glibc keeps most of those pages in its heap,
    so without this the process keeps ~2x the quantized model's size resident (measured on SmolLM2).
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _bnb_config(precision: str, compute_dtype: torch.dtype, double_quant: bool) -> object:
    """The transformers BitsAndBytesConfig for "bnb-int8" or "bnb-nf4"."""
    from transformers import BitsAndBytesConfig

    if precision == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
    )
