"""``fedge client start`` as a device owner sees it when the server is not there: one line saying so, then retrying."""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedge.common.procs import free_port
from fedge.edge_client.federation.service import ServerWatch


def _wait_for(lines: queue.Queue, text: str, seconds: float) -> str:
    """The first line holding ``text`` (whitespace-normalised), or an AssertionError with what was seen instead."""
    seen, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            line = " ".join(lines.get(timeout=0.2).split())
        except queue.Empty:
            continue
        if text in line:
            return line
        seen.append(line)
    raise AssertionError(f"no {text!r} within {seconds:g} s; the client said:\n" + "\n".join(seen[-20:]))


def test_a_client_says_once_when_its_server_is_out_of_reach_and_keeps_retrying(tmp_path):
    port = free_port()  # nothing listens here until the test does
    cmd = [sys.executable, "-m", "fedge", "client", "start", "--server", f"127.0.0.1:{port}", "--data", "demo:iot",
           "--model", "none", "--no-worker", "--state", str(tmp_path / "c"), "--unreachable-after", "1"]  # fmt: skip
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    client = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in client.stdout], daemon=True).start()
    try:
        said = _wait_for(lines, f"cannot reach the server at 127.0.0.1:{port}", 60)
        assert "(connection refused); still retrying, every 20 s at most" in said
        assert client.poll() is None  # still retrying, not given up
        with socket.create_server(("127.0.0.1", port)):  # the server's port opens
            _wait_for(lines, f"reached the server at 127.0.0.1:{port}", 30)
        assert client.poll() is None
    finally:
        client.terminate()
        client.wait(timeout=30)
    assert client.returncode == 0  # SIGTERM stops it cleanly


def test_the_watch_speaks_once_per_outage(monkeypatch):
    import fedge.edge_client.federation.service as service

    reachable = {"now": False}
    monkeypatch.setattr(service, "probe", lambda host, port: None if reachable["now"] else "connection refused")
    said: list[str] = []
    watch = ServerWatch("pi.local:9092", grace_s=10, retry_s=20, say=said.append)
    for t in range(0, 30):  # down for 30 s: one line, once 10 s have passed
        watch.check(float(t))
    assert said == ["cannot reach the server at pi.local:9092 (connection refused); still retrying, every 20 s at most"]
    reachable["now"] = True
    watch.check(100.0)
    watch.check(200.0)
    assert said[1:] == ["reached the server at pi.local:9092"]
    reachable["now"] = False
    watch.check(231.0)
    watch.check(236.0)  # a blip shorter than the grace is not worth a line
    reachable["now"] = True
    watch.check(241.0)
    assert len(said) == 2


def test_a_supernode_the_server_forgot_is_restarted_even_if_it_hangs(tmp_path):
    """Flower's SuperNode can hang after a restarted SuperLink answers its heartbeat with 401 (seen in CI): the
    supervisor sees the line in its output, stops it, and starts a new one after the backoff."""
    import sys
    import time
    from types import SimpleNamespace

    from fedge.edge_client.federation.service import Supervisor

    hang = [sys.executable, "-c", "import time; print('httpx.HTTPStatusError: 401 Unauthorized', flush=True); "
            "time.sleep(600)"]  # fmt: skip
    sup = object.__new__(Supervisor)
    said = []
    sup.client = SimpleNamespace(max_retries=None, server="127.0.0.1:1", launcher=False)
    sup.launcher_on = False
    sup.say, sup.log_path, sup.cmd, sup.env = said.append, tmp_path / "node.log", hang, None
    sup.launcher, sup.launcher_restart_at = None, None
    sup.watch = SimpleNamespace(check=lambda now: None)
    sup.worker_wanted, sup.worker, sup.node_wanted = False, None, True
    sup.backoff, sup.restarts, sup.restart_at = 1.0, 0, None
    sup._start_node(time.monotonic())
    first = sup.node
    end = time.monotonic() + 30
    while sup.node is first and time.monotonic() < end:
        sup.tick(time.monotonic())
        time.sleep(0.2)
    assert first.poll() is not None and sup.node is not first, said
    assert any("no longer knows" in m for m in said) and "401 Unauthorized" in (tmp_path / "node.log").read_text()

    # The agent keeps the SuperNode out during a long hold: stopped, not restarted, until it wakes it.
    second = sup.node
    sup.sleep_node()
    assert second.poll() is not None and sup.node is None
    for _ in range(5):
        sup.tick(time.monotonic() + 3600)
    assert sup.node is None
    sup.wake_node(time.monotonic())
    assert sup.node is not None and sup.node.poll() is None
    sup.node.kill()


def test_the_clientapp_launcher_runs_beside_the_supernode_and_is_restarted_while_the_node_lives(tmp_path, monkeypatch):
    """fedge's launcher (fedge.edge_client.federation.launcher) starts with the node, told the node's pid; one that
    exits while the node runs is started again; it stops with the node."""
    from types import SimpleNamespace

    from fedge.edge_client.federation import service
    from fedge.edge_client.federation.service import Supervisor

    started = []

    def fake_launcher(device, runtime_port, node_pid):
        started.append((runtime_port, node_pid))
        return [sys.executable, "-c", "import time; time.sleep(600)"]

    monkeypatch.setattr(service, "launcher_command", fake_launcher)
    sup = object.__new__(Supervisor)
    said = []
    sup.client = SimpleNamespace(max_retries=None, server="127.0.0.1:1", launcher=True)
    sup.launcher_on = True
    sup.say, sup.log_path, sup.env = said.append, tmp_path / "node.log", None
    sup.cmd = [sys.executable, "-c", "import time; time.sleep(600)"]
    sup.device, sup.runtime_port, sup.launcher = None, 4321, None
    sup.launcher_started, sup.launcher_backoff, sup.launcher_restart_at = 0.0, 1.0, None
    sup.watch = SimpleNamespace(check=lambda now: None)
    sup.worker_wanted, sup.worker, sup.node_wanted = False, None, True
    sup.backoff, sup.restarts, sup.restart_at, sup.suspended = 1.0, 0, None, False
    try:
        sup._start_node(time.monotonic())
        first = sup.launcher
        assert first.poll() is None and started == [(4321, sup.node.pid)]
        first.kill()
        first.wait()
        now = time.monotonic()
        sup.tick(now)  # seen at once; started again after its backoff (1 s, doubling while it keeps exiting)
        assert first.returncode is not None and len(started) == 1
        assert any("launcher exited" in m and "in 1 s" in m for m in said), said
        sup.tick(now + 1.5)
        assert sup.launcher is not first and sup.launcher.poll() is None and len(started) == 2
        sup.launcher.kill()
        sup.launcher.wait()
        sup.tick(now + 2)
        assert any("in 2 s" in m for m in said), said
        sup.tick(now + 4.5)
        assert len(started) == 3
        second = sup.launcher
        sup.sleep_node()
        assert second.poll() is not None and sup.launcher is None and sup.node is None
    finally:
        sup.stop()


def test_with_the_launcher_the_supernode_starts_no_clientapp_itself_and_shares_a_private_secret(tmp_path):
    from fedge.edge_client.federation.service import ClientSettings, launcher_command, prepare_device, supernode_command
    from fedge.edge_client.federation.settings import Device

    device = prepare_device(Device(data="demo:iot", state_dir=tmp_path / "state"))
    cmd, _ = supernode_command(ClientSettings("127.0.0.1:9092"), device, runtime_port=4321)
    assert cmd[cmd.index("--isolation") + 1] == "process" and cmd[cmd.index("--port") + 1] == "4321"
    secret = Path(cmd[cmd.index("--superexec-auth-secret-file") + 1])
    assert secret.stat().st_mode & 0o077 == 0 and len(secret.read_bytes()) == 64
    first = secret.read_bytes()
    cmd, _ = supernode_command(ClientSettings("127.0.0.1:9092"), device, runtime_port=4321)
    assert secret.read_bytes() == first  # kept while it stays private
    secret.chmod(0o644)  # a state directory copied with looser permissions: others may have read it, so a new one
    cmd, _ = supernode_command(ClientSettings("127.0.0.1:9092"), device, runtime_port=4321)
    assert secret.stat().st_mode & 0o077 == 0 and len(secret.read_bytes()) == 64 and secret.read_bytes() != first
    launcher = launcher_command(device, 4321, node_pid=99)
    assert launcher[launcher.index("--runtime-api-address") + 1] == "127.0.0.1:4321"
    assert launcher[launcher.index("--parent-pid") + 1] == "99"
    assert launcher[launcher.index("--superexec-auth-secret-file") + 1] == str(secret)
    # Flower's own: the SuperNode starts a flwr-clientapp per message (its SuperExec), no secret
    cmd, _ = supernode_command(ClientSettings("127.0.0.1:9092", launcher=False), device)
    assert "--isolation" not in cmd and "--superexec-auth-secret-file" not in cmd


def test_the_supernodes_retry_wait_is_flowers():
    """service.SUPERNODE_RETRY_S copies Flower's constant (so that the agent does not import Flower): kept equal."""
    from flwr.common.constant import MAX_RETRY_DELAY

    from fedge.edge_client.federation.service import SUPERNODE_RETRY_S

    assert SUPERNODE_RETRY_S == MAX_RETRY_DELAY


def test_a_waiting_agent_process_does_not_import_flower(tmp_path):
    """Flower's modules cost a process ~50 MB RSS: the agent's own process (its Supervisor built, the SuperNode's
    command ready) holds none of them; Flower runs in the SuperNode and the launcher."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from fedge.edge_client.agent import daemon\n"
        "from fedge.edge_client.federation.service import ClientSettings, Supervisor\n"
        "from fedge.edge_client.federation.settings import Device\n"
        f"Supervisor(ClientSettings('127.0.0.1:9092', model='none'), Device(data='demo:iot', "
        f"state_dir=Path({str(tmp_path / 'state')!r})), print)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'flwr'))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout
