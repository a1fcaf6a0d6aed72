"""The warm worker survives port probes and wrong keys, and answers its own ClientApp."""

from __future__ import annotations

import socket
import sys
from multiprocessing.connection import Client

import pytest

from fedge.common.procs import free_port, spawn, stop, wait_for_port
from fedge.edge_client.federation import worker
from fedge.edge_client.federation.settings import Device


def test_probes_and_wrong_keys_do_not_stop_the_worker(tmp_path):
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
        with pytest.raises(RuntimeError, match="the worker failed"):  # it answers: a bad request comes back as an error
            worker.call(device, "train", {"lora-r": -1}, {}, 1)
        assert proc.poll() is None
    finally:
        stop(proc)
