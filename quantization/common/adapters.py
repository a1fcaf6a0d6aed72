"""LoRA adapters on disk: PEFT format (``PeftModel.from_pretrained`` loads it) plus ``fedge_adapter.json``.

A save goes to a staging directory beside the target, is fsynced, then renamed into place, so a crash
or a full disk never leaves a half-written adapter where a finished one is expected.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from fedge.common.errors import FedgeError
from fedge.common.fsutil import publish_dir

META_FILE = "fedge_adapter.json"


def check_writable(out_dir: Path) -> None:
    """Fail early (before any training) if the adapter cannot be written to ``out_dir``."""
    parent = out_dir.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=parent, prefix=".fedge-probe-")
        probe.close()
    except OSError as err:
        raise FedgeError(f"{out_dir}: cannot write the adapter here ({err.strerror})") from None
    if out_dir.exists() and not out_dir.is_dir():
        raise FedgeError(f"{out_dir}: exists and is not a directory")


def save_adapter(model: torch.nn.Module, out_dir: Path, meta: dict) -> Path:
    """Write the model's LoRA adapter and ``meta`` (what produced it) atomically to ``out_dir``."""
    out_dir = Path(out_dir)
    check_writable(out_dir)
    staging = Path(tempfile.mkdtemp(dir=out_dir.resolve().parent, prefix=f".{out_dir.name}-"))
    try:
        model.save_pretrained(staging)
        meta = {**meta, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (staging / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
        publish_dir(staging, out_dir)
    except (OSError, _safetensors_error()) as err:  # a full disk can surface as either
        reason = getattr(err, "strerror", None) or err
        raise FedgeError(f"{out_dir}: could not save the adapter ({reason}); a previous one there is intact") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _safetensors_error() -> type[Exception]:
    """safetensors' own error type (raised instead of OSError by some failed writes, e.g. a full disk)."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # an older safetensors: its errors are OSErrors
        return OSError
    return SafetensorError


def read_meta(adapter_dir: Path) -> dict:
    """The ``fedge_adapter.json`` of an adapter directory ({} for a plain PEFT adapter)."""
    path = Path(adapter_dir) / META_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def load_adapter(model: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    """Attach a saved PEFT adapter to a base model (inference mode)."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FedgeError(f"{adapter_dir}: not an adapter directory (no adapter_config.json)")
    return PeftModel.from_pretrained(model, adapter_dir)
