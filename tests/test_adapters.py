"""Adapters on disk: a failed save (a full disk) is one clear error and leaves the previous adapter as it was."""

from __future__ import annotations

import pytest
from safetensors import SafetensorError

from fedge.common import adapters
from fedge.common.errors import FedgeError
from fedge.common.modeling import LoraSettings, add_lora


def test_a_save_that_fails_midway_keeps_the_previous_adapter(fresh_session, tmp_path, monkeypatch):
    model = add_lora(fresh_session.model, LoraSettings(r=2, alpha=4), seed=0)
    out = tmp_path / "adapter"
    adapters.save_adapter(model, out, {"round": 1})
    before = {f.name: f.read_bytes() for f in out.iterdir()}

    def disk_full(directory, *args, **kwargs):  # what safetensors raises when the write hits a full disk
        (directory / "adapter_model.safetensors").write_bytes(b"partial")
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(type(model), "save_pretrained", lambda self, directory, **kw: disk_full(directory))
    with pytest.raises(FedgeError, match="could not save the adapter .*No space left.*a previous one there is intact"):
        adapters.save_adapter(model, out, {"round": 2})
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no staging directory left behind
