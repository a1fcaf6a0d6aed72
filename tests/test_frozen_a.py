"""LoRA A kept on the device: stored when a message carries it, put back when one leaves it out, refused when the
store does not hold what the message names (the server then sends it again: test_strategy.py)."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.common import wire
from fedge.edge_client.federation.frozen_a import STORE, MissingLoraA, complete

A1, B1 = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"
A2, B2 = "m.v_proj.lora_A.weight", "m.v_proj.lora_B.weight"


def _adapter(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        A1: rng.normal(size=(4, 8)).astype(np.float32), B1: np.zeros((8, 4), np.float32),
        A2: rng.normal(size=(4, 8)).astype(np.float32), B2: np.ones((8, 4), np.float32),
    }  # fmt: skip


def _lean(adapter: dict) -> tuple[dict, dict]:
    a = {k: v for k, v in adapter.items() if ".lora_A." in k}
    return {k: v for k, v in adapter.items() if k not in a}, {wire.Cfg.LORA_A: wire.fingerprint(a)}


def test_a_message_with_a_is_stored_and_a_later_one_without_it_is_completed(tmp_path):
    full = _adapter()
    lean, config = _lean(full)
    assert complete(full, config, tmp_path) == (full, config[wire.Cfg.LORA_A])  # used as sent, A kept and named
    assert len(list((tmp_path / STORE).glob("*.npz"))) == 1
    completed, holds = complete(lean, config, tmp_path)
    assert holds == config[wire.Cfg.LORA_A] and set(completed) == set(full)
    assert all(np.array_equal(completed[k], full[k]) for k in full)


def test_without_a_fingerprint_the_adapter_is_the_whole_one_and_nothing_is_stored(tmp_path):
    full = _adapter()
    assert complete(full, {}, tmp_path) == (full, "")
    assert not (tmp_path / STORE).exists()


def test_a_node_that_cannot_keep_a_still_does_the_round_and_does_not_claim_it(tmp_path):
    full = _adapter()
    (tmp_path / STORE).write_text("a file where the store's directory should be")
    assert complete(full, _lean(full)[1], tmp_path) == (full, "")  # the server keeps sending it A


def test_a_node_that_does_not_hold_the_a_named_refuses_the_message(tmp_path):
    lean, config = _lean(_adapter())
    with pytest.raises(MissingLoraA, match="not held"):
        complete(lean, config, tmp_path)
    complete(_adapter(seed=1), _lean(_adapter(seed=1))[1], tmp_path)  # holds another A: still not this one
    with pytest.raises(MissingLoraA, match="not held"):
        complete(lean, config, tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "other values", "empty"])
def test_a_damaged_store_is_not_used_and_the_next_a_sent_replaces_it(tmp_path, damage):
    full = _adapter()
    lean, config = _lean(full)
    complete(full, config, tmp_path)
    (stored,) = (tmp_path / STORE).glob("*.npz")
    if damage == "garbage":
        stored.write_bytes(b"PK\x03\x04 not a zip at all")
    elif damage == "other values":
        np.savez(stored, **{A1: full[A1] + 1, A2: full[A2]})
    else:
        stored.write_bytes(b"")
    with pytest.raises(MissingLoraA):
        complete(lean, config, tmp_path)
    assert complete(full, config, tmp_path)[1]  # the server sends A again: the damaged file is replaced
    assert np.array_equal(complete(lean, config, tmp_path)[0][A1], full[A1])


def test_an_a_that_does_not_match_its_fingerprint_or_a_fingerprint_that_is_no_file_name_is_refused(tmp_path):
    full = _adapter()
    _, config = _lean(_adapter(seed=1))
    with pytest.raises(MissingLoraA, match="does not match"):
        complete(full, config, tmp_path)
    for bad in ("../../etc/passwd", "ABCDEF0123456789", "١٢٣٤٥٦٧٨٩٠١٢٣٤٥٦"):  # no path; lower-case ASCII hex only
        with pytest.raises(MissingLoraA, match="hex"):
            complete(_lean(full)[0], {wire.Cfg.LORA_A: bad}, tmp_path)
    assert not (tmp_path / STORE).exists()
