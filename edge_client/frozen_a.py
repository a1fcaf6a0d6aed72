"""LoRA A kept on the device: with A frozen (FFA-LoRA, the default) it is the same every round, so the server sends
it to a node once and afterwards only B and A's fingerprint (`wire.Cfg.LORA_A`): half the bytes down.

`complete` puts the held A back into a message's adapter before any work, so everything after it sees the whole
adapter as before. A message that carries A is stored first (keyed by its fingerprint, written crash-safe, the
previous one removed); one that leaves A out is completed from the store, checked against the fingerprint. A
node that does not hold it (a new state directory, a damaged file) fails the message with `MissingLoraA`; the
server then sends A to that node again (`fedge.server.strategy`).
"""

from __future__ import annotations

import io
import logging
import zipfile
from pathlib import Path

import numpy as np

from fedge.common import wire
from fedge.common.fsutil import atomic_write_bytes
from fedge.common.lora import A_SUFFIX

log = logging.getLogger("fedge.client")
STORE = "lora-a"  # directory under the device's state directory


class MissingLoraA(Exception):
    """The message left LoRA A out and this node does not hold the A it names."""


def complete(arrays: dict[str, np.ndarray], config: dict, state_dir: Path) -> dict[str, np.ndarray]:
    """The message's adapter with LoRA A in it: as sent if it carries A (stored for later messages), else with
    the stored A whose fingerprint the config names. MissingLoraA when that A is not held here."""
    digest = config.get(wire.Cfg.LORA_A)
    if not isinstance(digest, str) or not digest:
        return arrays  # the whole adapter, as without a store
    sent_a = {k: v for k, v in arrays.items() if k.endswith(A_SUFFIX)}
    if sent_a:
        if wire.fingerprint(sent_a) != digest:
            raise MissingLoraA(f"the LoRA A sent does not match its fingerprint {digest}")
        _store(sent_a, digest, state_dir)
        return arrays
    held = _load(digest, state_dir)
    if held is None:
        raise MissingLoraA(f"LoRA A {digest} is not held on this node: the server sends it with the next message")
    return {**held, **arrays}


def _path(digest: str, state_dir: Path) -> Path:
    if not digest.isalnum() or len(digest) > 64:  # it names a file: a fingerprint is hex
        raise MissingLoraA(f"LoRA A fingerprint {digest!r}: expected hex digits")
    return state_dir / STORE / f"{digest}.npz"


def _store(a: dict[str, np.ndarray], digest: str, state_dir: Path) -> None:
    """Keep ``a`` as the node's LoRA A (once per fingerprint); a store that fails costs the next message a resend."""
    path = _path(digest, state_dir)
    if path.is_file() and _load(digest, state_dir) is not None:
        return  # held already (a damaged file is written again)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **a)
        atomic_write_bytes(path, buffer.getvalue())
        for old in path.parent.glob("*.npz"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError as err:
        log.warning("cannot keep LoRA A in %s (%s): the server will send it again", path.parent, err)


def _load(digest: str, state_dir: Path) -> dict[str, np.ndarray] | None:
    """The stored A with this fingerprint, or None (absent, unreadable, or not what the fingerprint says)."""
    path = _path(digest, state_dir)
    try:
        with np.load(path, allow_pickle=False) as stored:
            a = {name: stored[name] for name in stored.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:  # absent, or not an npz file
        if path.exists():
            log.warning("LoRA A in %s is unreadable (%s): asking the server for it", path, err)
        return None
    if not a or wire.fingerprint(a) != digest:
        log.warning("LoRA A in %s does not match its fingerprint: asking the server for it", path)
        return None
    return a
