"""The wire format: adapter arrays through ArrayRecords, round settings through ConfigRecords."""

from __future__ import annotations

import numpy as np
import pytest

from fedge.common import wire


def test_arrays_round_trip_through_a_record():
    arrays = {
        "l0.lora_A.weight": np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32),
        "l0.lora_B.weight": np.zeros((8, 4), np.float32),
    }
    record = wire.to_record(arrays)
    back = wire.from_record(record)
    assert list(back) == list(arrays)
    for k in arrays:
        np.testing.assert_array_equal(back[k], arrays[k])
    assert wire.record_bytes(record) >= 2 * 4 * 8 * 4
    assert wire.fingerprint(back) == wire.fingerprint(arrays)
    arrays["l0.lora_B.weight"][0, 0] = 1e-6
    assert wire.fingerprint(back) != wire.fingerprint(arrays)


def test_a_packed_record_is_two_arrays_whatever_the_tensor_count_and_reads_back_exactly():
    # Flower moves every Array as its own objects: fedge packs an adapter's tensors into one, with an index.
    from flwr.app import ArrayRecord

    rng = np.random.default_rng(1)
    arrays = {f"l{i}.lora_B.weight": rng.normal(size=(6, 2)).astype(np.float32) for i in range(300)}
    arrays |= {"codec.header": np.frombuffer(b'{"v": 1}', np.uint8), "q": np.arange(5, dtype=np.int8).reshape(5, 1)}
    record = wire.to_record(arrays)
    assert set(record) == {wire.PACKED_INDEX, wire.PACKED_DATA}
    shipped = ArrayRecord.deflate(record) and record  # the bytes Flower serializes are the arrays' .npy files
    for back in (wire.from_record(shipped), wire.read_record(shipped, max_bytes=1 << 20)):
        assert list(back) == list(arrays)
        assert all(back[k].dtype == a.dtype and np.array_equal(back[k], a) for k, a in arrays.items())
    assert wire.read_record(wire.to_record(arrays, packed=False), 1 << 20).keys() == arrays.keys()  # both forms
    with pytest.raises(ValueError, match="at most 100 expected"):
        wire.read_record(record, max_bytes=100)


def _packed(index: object, data: bytes = b"", extra: dict | None = None):
    import json

    from flwr.app import Array, ArrayRecord

    raw = index if isinstance(index, bytes) else json.dumps(index).encode()
    arrays = {wire.PACKED_INDEX: np.frombuffer(raw, np.uint8), wire.PACKED_DATA: np.frombuffer(data, np.uint8)}
    return ArrayRecord({k: Array(v) for k, v in {**arrays, **(extra or {})}.items()})


@pytest.mark.parametrize(
    "record, message",
    [
        (lambda: _packed(b"[[not json"), "not JSON"),
        (lambda: _packed({"a": 1}), "expected a list"),
        (lambda: _packed([["a", "<f4"]]), r"expected \[name, dtype, shape\]"),
        (lambda: _packed([["a", "|O", [1]]], b"\0" * 8), "not a plain number type"),
        (lambda: _packed([["a", "f4,i4", [1]]], b"\0" * 8), "not a plain number type"),
        (lambda: _packed([["a", "<U4", [1]]], b"\0" * 16), "not a plain number type"),
        (lambda: _packed([["a", "<f3", [1]]], b"\0" * 4), "not a plain number type"),
        (lambda: _packed([["a", ",f4", [1]]], b"\0" * 4), "not a plain number type"),  # numpy: SyntaxError
        (lambda: _packed([["a", "i4,(", [1]]], b"\0" * 4), "not a plain number type"),
        (lambda: _packed([["a", "<f4", [-1]]], b"\0" * 4), "not a list of at most 8 sizes"),
        (lambda: _packed([["a", "<f4", [2**39] * 8]], b"\0" * 4), "describes"),  # claims far more than sent
        (lambda: _packed([["a", "<f4", [2]]], b"\0" * 4), "describes 8 bytes of tensors, fedge.data holds 4"),
        (lambda: _packed([["a", "<f4", [1]]], b"\0" * 12), "describes 4 bytes"),  # bytes nobody accounts for
        (lambda: _packed([["a", "<f4", [1]], ["a", "<f4", [1]]], b"\0" * 8), "appears twice"),
        (lambda: _packed([["", "<f4", [1]]], b"\0" * 4), "1..400 characters"),
        (lambda: _packed([["a", "<f4", [1]]], b"\0" * 4, {"other": np.zeros(1, np.float32)}), "nothing else"),
    ],
)
def test_a_hostile_packed_record_is_refused_naming_the_problem(record, message):
    with pytest.raises(ValueError, match=message):
        wire.read_record(record(), max_bytes=1 << 20)


def test_an_oversized_packed_index_is_refused_before_it_is_parsed():
    index = b"[" + b"[]," * (wire.MAX_INDEX_BYTES // 3) + b"[]]"  # parsing it would take ~20x its size
    with pytest.raises(ValueError, match="at most 4194304"):
        wire.read_record(_packed(index), max_bytes=1 << 23)


def test_round_settings_round_trip_through_a_config_record():
    from flwr.app import ConfigRecord

    settings = wire.RoundSettings(model="/x/y", steps=7, lr=3e-4, lora_r=4, lora_alpha=8, lora_targets="q_proj")
    record = ConfigRecord(settings.to_config())
    assert wire.RoundSettings.from_config(record) == settings
    assert wire.RoundSettings.from_config({}) == wire.RoundSettings()


def test_round_settings_validate():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        wire.RoundSettings(steps=0)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        wire.RoundSettings(lr=0)
