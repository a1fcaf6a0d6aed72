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
