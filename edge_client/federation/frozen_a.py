"""LoRA A kept on the device: with A frozen (FFA-LoRA, the default) it is the same every round, so the server sends
it to a node once and afterwards only B and A's fingerprint (`wire.Cfg.LORA_A`): half the bytes down.

`complete` puts the held A back into a message's adapter before any work, so everything after it sees the whole
adapter as before. A message that carries A is stored first (keyed by its fingerprint, written crash-safe, the
previous one removed); one that leaves A out is completed from the store, checked against the fingerprint. The
reply names the A the node holds (`wire.Client.LORA_A`, only once it is stored): the server leaves A out only for
nodes that said so. A node asked without A that does not hold it (a new state directory, a damaged file) fails
the message with `MissingLoraA`; the server then sends A to that node again (`fedge.server.strategy`).
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import numpy as np

from fedge.common import wire
from fedge.common.fsutil import atomic_write_bytes
from fedge.common.lora import A_SUFFIX

log = logging.getLogger("fedge.client")
STORE = "lora-a"  # directory under the device's state directory
_FINGERPRINT = re.compile(r"[0-9a-f]{16}")  # wire.fingerprint's


class MissingLoraA(Exception):
    """The message left LoRA A out and this node does not hold the A it names. Its text starts with
    `wire.LORA_A_MISSING`, which the server looks for (Flower's simulation keeps only an exception's text)."""

    def __init__(self, why: str) -> None:
        super().__init__(f"{wire.LORA_A_MISSING}: {why}")


def complete(arrays: dict[str, np.ndarray], config: dict, state_dir: Path) -> tuple[dict[str, np.ndarray], str]:
    """(the message's adapter with LoRA A in it, the fingerprint of the A this node now holds or ''). As sent if it
    carries A (stored for later messages), else with the stored A whose fingerprint the config names.
    MissingLoraA when that A is not held here."""
    digest = config.get(wire.Cfg.LORA_A)
    if not isinstance(digest, str) or not digest:
        return arrays, ""  # the whole adapter, as without a store
    if not _FINGERPRINT.fullmatch(digest):  # it names a file
        raise MissingLoraA(f"LoRA A fingerprint {digest[:80]!r}: expected 16 hex digits")
    sent_a = {k: v for k, v in arrays.items() if k.endswith(A_SUFFIX)}
    if sent_a:
        if wire.fingerprint(sent_a) != digest:
            raise MissingLoraA(f"the LoRA A sent does not match its fingerprint {digest}")
        return arrays, digest if _store(sent_a, digest, state_dir) else ""
    held = _load(digest, state_dir)
    if held is None:
        raise MissingLoraA(f"LoRA A {digest} is not held on this node: the server sends it with the next message")
    return {**held, **arrays}, digest


def _path(digest: str, state_dir: Path) -> Path:
    return state_dir / STORE / f"{digest}.npz"


def _store(a: dict[str, np.ndarray], digest: str, state_dir: Path) -> bool:
    """Keep ``a`` as the node's LoRA A (once per fingerprint); False if it cannot be kept (the reply then does
    not claim it, and the server keeps sending A). Never raises: a message that carries A is always usable."""
    path = _path(digest, state_dir)
    try:
        if path.is_file() and _load(digest, state_dir) is not None:
            return True  # held already (a damaged file is written again)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **a)
        atomic_write_bytes(path, buffer.getvalue())
        for old in path.parent.glob("*.npz"):
            if old != path:
                old.unlink(missing_ok=True)
    except Exception as err:  # noqa: BLE001 (a full disk, a read-only store: the round goes on without it)
        log.warning("cannot keep LoRA A in %s (%s): the server will send it again", path.parent, err)
        return False
    return True


def _load(digest: str, state_dir: Path) -> dict[str, np.ndarray] | None:
    """The stored A with this fingerprint, or None (absent, unreadable, or not what the fingerprint says)."""
    path = _path(digest, state_dir)
    try:
        with np.load(path, allow_pickle=False) as stored:
            a = {name: stored[name] for name in stored.files}
    except Exception as err:  # noqa: BLE001 (absent, or damaged in any of the ways a zip of arrays can be)
        if path.exists():
            log.warning("LoRA A in %s is unreadable (%s): asking the server for it", path, err)
        return None
    if not a or wire.fingerprint(a) != digest:
        log.warning("LoRA A in %s does not match its fingerprint: asking the server for it", path)
        return None
    return a
