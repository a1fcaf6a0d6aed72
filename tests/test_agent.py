"""The agent's policy and its control socket, with a recording stand-in for the SuperNode and worker it supervises,
and the service units it installs. (The agent against a real server: tests/test_agent_federation.py.)"""

from __future__ import annotations

import configparser
import json
import os
import plistlib
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedge.edge_client.agent import hold
from fedge.edge_client.agent.conditions import RunConditions
from fedge.edge_client.agent.daemon import Agent, AgentSettings, ControlServer, request, rotate_logs, socket_path
from fedge.edge_client.agent.units import Service, launchd_plist, systemd_unit


class FakeSupervisor:
    """What the agent drives: records suspend/resume/unload/load instead of signalling processes."""

    def __init__(self, state_dir: Path) -> None:
        self.device = SimpleNamespace(state_dir=state_dir, name="clinic-3", worker_port=1234)
        self.client = SimpleNamespace(server="fed.example.org:9092")
        self.worker_wanted, self.node_wanted, self.suspended, self.calls = True, True, False, []

    def sleep_node(self) -> None:
        self.node_wanted = False
        self.calls.append("sleep")

    def wake_node(self, now: float) -> None:
        self.node_wanted = True
        self.calls.append("wake")

    def suspend(self) -> None:
        self.suspended = True
        self.calls.append("suspend")

    def resume(self) -> None:
        if self.suspended:
            self.calls.append("resume")
        self.suspended = False

    def unload_worker(self) -> None:
        self.worker_wanted = False
        self.calls.append("unload")

    def load_worker(self) -> None:
        self.worker_wanted = True
        self.calls.append("load")


def _agent(tmp_path: Path, **settings) -> tuple[Agent, Path]:
    readings = tmp_path / "readings.json"
    _conditions(readings, power=True)
    state = tmp_path / "state"
    state.mkdir()
    agent = Agent(FakeSupervisor(state), RunConditions(source=readings), AgentSettings(**settings))
    return agent, readings


def _conditions(path: Path, **ok: bool | None) -> None:
    path.write_text(json.dumps({name: [value, f"{name} says {value}"] for name, value in ok.items()}))


def test_a_failing_condition_holds_the_device_with_its_reason_and_a_returning_one_releases_it(tmp_path):
    agent, readings = _agent(tmp_path)
    agent.check(0.0)
    assert agent.state == "ready" and hold.held(agent.state_dir) is None
    _conditions(readings, power=False, network=True)
    agent.check(1.0)
    assert agent.state == "waiting" and hold.held(agent.state_dir) == "power: power says False"
    _conditions(readings, power=None)  # unknown is not satisfied unless the config says so
    agent.check(2.0)
    assert hold.held(agent.state_dir) == "power: power says None"
    agent.conditions.unknown_ok = True
    agent.check(3.0)
    assert agent.state == "ready" and hold.held(agent.state_dir) is None
    status = json.loads((agent.state_dir / "agent-status.json").read_text())
    assert status["state"] == "ready" and status["readings"][0]["name"] == "power"


def test_a_round_under_way_is_halted_at_once_resumed_and_ended_after_max_pause(tmp_path):
    agent, readings = _agent(tmp_path, max_pause=60.0)
    hold.write_progress(agent.state_dir, "train", 3, 4, 10)  # this process stands for the worker
    agent.check(0.0)
    assert agent.state == "training" and agent.current["step"] == 4
    _conditions(readings, power=False)
    agent.check(1.0)
    assert agent.state == "halted" and agent.supervisor.calls == ["suspend"]
    _conditions(readings, power=True)
    agent.check(2.0)
    assert (
        agent.state == "training" and agent.supervisor.calls == ["suspend", "resume"] and not hold.held(agent.state_dir)
    )
    _conditions(readings, power=False)
    agent.check(3.0)
    agent.check(30.0)
    assert agent.supervisor.suspended  # still within max_pause: waits
    agent.check(64.0)
    assert not agent.supervisor.suspended and hold.held(agent.state_dir)  # runs one step, sees the hold, sends
    hold.clear_progress(agent.state_dir)
    agent.check(65.0)
    assert agent.state == "waiting" and [r["round"] for r in agent.rounds] == [3]


def test_pause_and_resume_from_the_owner_over_the_control_socket(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    agent, _ = _agent(tmp_path)
    path = socket_path(agent.state_dir)
    server = ControlServer(path, agent)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert oct(path.parent.stat().st_mode & 0o777) == "0o700" and oct(path.stat().st_mode & 0o777) == "0o600"
        assert request(path, "pause")["state"] == "paused"
        assert hold.held(agent.state_dir) == "paused by the owner"
        assert request(path, "status")["reason"] == "paused by the owner"
        assert request(path, "resume")["state"] == "ready" and hold.held(agent.state_dir) is None
        assert "unknown command" in request(path, "format-disk")["error"]
        with pytest.raises(Exception, match="already running"):
            ControlServer(path, agent)  # a second agent for the same device
        assert request(path, "stop") == {"state": "stopping"} and agent.stopping.is_set()
    finally:
        server.close()
    assert not path.exists()


def test_a_long_hold_takes_the_node_out_of_the_federation_until_the_conditions_return(tmp_path):
    agent, readings = _agent(tmp_path, unload_after=100.0, sleep_after=1000.0)
    agent.last_work = 0.0
    _conditions(readings, power=False)
    agent.check(10.0)
    hold.write_progress(agent.state_dir, "train", 1, 0, 10)  # a round under way: never asleep in the middle
    agent.check(2000.0)
    assert "sleep" not in agent.supervisor.calls
    hold.clear_progress(agent.state_dir)
    agent.check(2001.0)
    assert agent.supervisor.calls[-1] == "sleep" and agent.state == "asleep"
    assert json.loads((agent.state_dir / "agent-status.json").read_text())["node"].startswith("left")
    agent.paused = True  # the owner pausing it keeps it out too
    _conditions(readings, power=True)
    agent.check(2100.0)
    assert agent.supervisor.calls[-1] == "sleep" and agent.state == "asleep"
    agent.paused = False
    agent.check(2101.0)
    assert agent.supervisor.calls[-1] == "wake" and agent.state == "ready" and agent.supervisor.node_wanted
    _conditions(readings, power=False)
    agent.check(2102.0)
    agent.check(2900.0)  # held again, for less than sleep_after: stays in
    assert agent.supervisor.calls[-1] != "sleep"
    (tmp_path / "never").mkdir()
    never, readings = _agent(tmp_path / "never", sleep_after=0.0)
    _conditions(readings, power=False)
    never.check(0.0)
    never.check(1e6)
    assert "sleep" not in never.supervisor.calls


def test_the_model_is_unloaded_when_idle_or_held_and_loaded_again(tmp_path):
    agent, readings = _agent(tmp_path, unload_after=100.0)
    agent.last_work = 0.0
    agent.check(50.0)
    assert agent.supervisor.worker_wanted
    agent.check(150.0)  # no round for 150 s
    assert agent.supervisor.calls == ["unload"]
    agent.check(160.0)
    assert agent.supervisor.calls == ["unload"]  # idle and eligible: stays unloaded until a round arrives
    hold.write_progress(agent.state_dir, "train", 1, 0, 10)
    agent.check(170.0)
    assert agent.supervisor.calls == ["unload", "load"]
    hold.clear_progress(agent.state_dir)
    _conditions(readings, power=False)
    agent.check(180.0)
    agent.check(290.0)  # held back for 110 s
    assert agent.supervisor.calls == ["unload", "load", "unload"]
    _conditions(readings, power=True)
    agent.check(300.0)
    assert agent.supervisor.calls == ["unload", "load", "unload", "load"]  # eligible again: ready for the next round


def test_a_hold_from_an_agent_that_is_gone_counts_for_nothing(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / hold.HOLD_FILE).write_text(json.dumps({"pid": int(dead.stdout), "reason": "on battery"}))
    assert hold.held(tmp_path) is None
    hold.set_hold(tmp_path, "on battery")
    assert hold.held(tmp_path) == "on battery"


def test_logs_rotate_by_copy_and_truncate_so_their_writers_go_on(tmp_path):
    log = tmp_path / "worker.log"
    with open(log, "ab") as writer:  # a child process's append-only log
        writer.write(b"x" * 3000)
        writer.flush()
        rotate_logs(tmp_path, max_mb=1000 / 2**20)
        writer.write(b"after")
        writer.flush()
    assert (tmp_path / "worker.log.1").stat().st_size == 3000 and log.read_bytes() == b"after"


@pytest.mark.parametrize(("kwargs", "named"), [(dict(nice=20), "nice"), (dict(check_every=0), "check_every"),
                                               (dict(unload_after=-1), "unload_after"),
                                               (dict(interrupted="maybe"), "interrupted")])  # fmt: skip
def test_bad_agent_settings_are_refused_naming_the_field(kwargs, named):
    with pytest.raises(ValueError, match=named):
        AgentSettings(**kwargs)


# --- service units ----------------------------------------------------------------------------------------------


def _unit(scope: str) -> configparser.ConfigParser:
    service = Service("clinic 3/a", Path("/etc/fedge/my device.toml"), scope)
    parser = configparser.ConfigParser(strict=True, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(systemd_unit(service, "alice"))
    return parser


@pytest.mark.parametrize("scope", ["user", "system"])
def test_the_systemd_unit_has_every_key_a_background_service_needs(scope):
    unit = _unit(scope)
    svc = unit["Service"]
    assert svc["ExecStart"].startswith(sys.executable) and '"/etc/fedge/my device.toml"' in svc["ExecStart"]
    assert svc["Restart"] == "on-failure" and svc["Nice"] == "10" and svc["IOSchedulingClass"] == "idle"
    assert unit["Unit"]["After"] == "network-online.target"
    assert unit["Install"]["WantedBy"] == ("multi-user.target" if scope == "system" else "default.target")
    assert svc.get("User") == ("alice" if scope == "system" else None)
    assert Service("clinic 3/a", Path("/x.toml")).unit_name == "fedge-agent-clinic-3-a.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_the_unit(tmp_path):
    service = Service("clinic-3", tmp_path / "device.toml", "system", tmp_path)
    service.path.write_text(systemd_unit(service, "root"))
    done = subprocess.run(["systemd-analyze", "verify", str(service.path)], capture_output=True, text=True)
    assert done.returncode == 0 and not (done.stderr + done.stdout).strip(), done.stderr
    bad = tmp_path / "bad.service"  # the check can fail: a misspelt key is reported
    bad.write_text(systemd_unit(service, "root").replace("Restart=", "Restrat="))
    done = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True, text=True)
    assert "Unknown key" in done.stderr


def test_the_launchd_agent_runs_at_load_and_is_kept_alive():
    plist = plistlib.loads(launchd_plist(Service("pi-1", Path("/Users/a/device.toml"), platform="darwin")))
    assert plist["Label"] == "org.fedge.agent.pi-1" and plist["RunAtLoad"] is True
    assert plist["ProgramArguments"][-4:] == ["agent", "run", "--config", "/Users/a/device.toml"]
    assert plist["KeepAlive"] == {"SuccessfulExit": False} and plist["LowPriorityIO"] is True


def test_install_and_uninstall_write_and_remove_the_unit_from_the_cli(tmp_path):
    from fedge.cli import main

    config = tmp_path / "device.toml"
    config.write_text('[client]\nserver = "127.0.0.1:9092"\n\n[device]\nname = "pi-1"\ndata = "demo:iot"\n\n'
                      '[conditions]\nmax_temp = 70.0\nmax_temp_continue = 80.0\n')  # fmt: skip
    units = tmp_path / "units"
    assert main(["agent", "install", "--config", str(config), "--unit-dir", str(units), "--no-start"]) == 0
    unit = units / "fedge-agent-pi-1.service"
    assert f"--config {config}" in unit.read_text()
    assert main(["agent", "uninstall", "--config", str(config), "--unit-dir", str(units), "--no-start"]) == 0
    assert not unit.exists()
    config.write_text(config.read_text().replace("max_temp = 70.0", "max_temp = 95.0"))
    assert main(["agent", "install", "--config", str(config), "--unit-dir", str(units), "--no-start"]) == 2
    assert not unit.exists()  # a config the agent would refuse is never installed


def test_status_without_an_agent_is_one_line(tmp_path, capsys, monkeypatch):
    from fedge.cli import main

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    assert main(["agent", "status", "--state", str(tmp_path)]) == 2
    assert "no agent is running" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX")
def test_the_control_directory_must_be_the_owners_alone(tmp_path):
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    run.chmod(0o755)
    agent, _ = _agent(tmp_path)
    with pytest.raises(Exception, match="only this user"):
        ControlServer(run / "a.sock", agent)


def test_a_finished_round_is_listed_with_what_it_cost_the_device(tmp_path):
    agent, _ = _agent(tmp_path)
    hold.write_progress(agent.state_dir, "train", 4, 3, 10)
    agent.check(0.0)
    work = agent.state_dir / "work" / "abc"
    work.mkdir(parents=True)
    metrics = {"steps": 10, "train-seconds": 41.5, "energy-j": 612.0, "upload-bytes": 2_600_000, "name": "x"}
    (work / "metrics.json").write_text(json.dumps(metrics))
    hold.clear_progress(agent.state_dir)
    agent.check(1.0)
    (last,) = agent.status()["rounds"]
    assert last["round"] == 4 and last["energy_j"] == 612.0 and last["upload_bytes"] == 2_600_000
    assert last["steps"] == 10 and last["seconds"] >= 0 and "name" not in last
    (work / "metrics.json").write_text("{not json")
    from fedge.edge_client.agent.daemon import round_cost

    assert round_cost(agent.state_dir, 0.0) == {}
