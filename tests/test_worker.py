"""The warm worker survives port probes and wrong keys, and answers its own ClientApp."""

from __future__ import annotations

import dataclasses
import socket
import sys
from multiprocessing.connection import Client

import pytest

from fedge.common.modeling import ModelHolder
from fedge.common.procs import free_port, spawn, stop, wait_for_port
from fedge.common.wire import RoundSettings
from fedge.edge_client.federation import worker
from fedge.edge_client.federation.limits import RoundDeclined
from fedge.edge_client.federation.settings import Device


def test_probes_and_wrong_keys_do_not_stop_the_worker(tmp_path, tiny_model_dir):
    port = free_port()
    log = tmp_path / "worker.log"
    cmd = [sys.executable, "-m", "fedge.edge_client.federation.worker", "--state", str(tmp_path), "--port", str(port)]
    proc = spawn([*cmd, "--cache-dir", str(tmp_path / "cache")], None, log)
    try:
        wait_for_port("127.0.0.1", port, proc, log)  # itself a probe: connects and hangs up mid-handshake
        socket.create_connection(("127.0.0.1", port)).close()
        with pytest.raises(Exception):  # noqa: B017 (AuthenticationError or a reset: either way, refused)
            Client(("127.0.0.1", port), authkey=b"not the key").send("hello")
        device = Device("d", "demo:iot", None, tmp_path, tmp_path / "cache", worker_port=port)
        with pytest.raises(RuntimeError, match="the worker failed") as failed:  # a bad request comes back as an error
            worker.call(device, "train", {"lora-r": -1}, {}, 1)
        assert "\n" not in str(failed.value) and "Traceback" not in str(failed.value)  # one line; the rest is logged
        assert "Traceback" in log.read_text()
        small = dataclasses.replace(device, profile="base=pi4-2gb,memory_bytes=20000000")
        settings = RoundSettings(model=str(tiny_model_dir), steps=3, batch=2, seq_len=64, lora_r=8, deadline_s=60)
        initial = ModelHolder(tmp_path / "cache", "fp32").initial_adapter(settings.model, settings.lora(), 0)
        with pytest.raises(RoundDeclined, match="no training plan fits"):  # a decline, not a failure
            worker.call(small, "train", settings.to_config(), initial, 1)
        assert proc.poll() is None
    finally:
        stop(proc)


def test_a_round_the_worker_declines_is_a_decline_with_its_one_line_reason(tmp_path, tiny_model_dir):
    """No plan fits a 20 MB device: the worker says so as a decline (the server records it as one), not as a
    failure whose reason is the worker's traceback."""
    from fedge.common import wire
    from fedge.common.modeling import ModelHolder

    device = Device("pi", "demo:iot", None, tmp_path, tmp_path / "cache", profile="base=pi4-2gb,memory_bytes=20000000")
    settings = wire.RoundSettings(model=str(tiny_model_dir), steps=3, batch=2, seq_len=64, lora_r=8, deadline_s=60)
    holder = ModelHolder(device.cache_dir, "fp32")
    initial = holder.initial_adapter(settings.model, settings.lora(), settings.seed)
    request = {"kind": "train", "node": device.to_node_config(), "config": settings.to_config(), "arrays": initial,
               "round": 1}  # fmt: skip
    reply = worker._handle(holder, request)
    assert reply["declined"] is True and "no training plan fits" in reply["error"]
    assert "\n" not in reply["error"] and "Traceback" not in reply["error"]
    broken = worker._handle(holder, {**request, "config": {**settings.to_config(), "lora-r": -1}})
    assert "declined" not in broken and "\n" not in broken["error"] and "Traceback" not in broken["error"]
    assert broken["error"].startswith("ValueError: ")
