"""fedge's ClientApp launcher: Flower's SuperExec with ClientApp processes forked from a pre-imported fork server.

Its run in a real federation (SuperLink, SuperNodes, ClientApps forked per message) is in test_federation.py.
"""

from __future__ import annotations

import multiprocessing
import time

import pytest

from fedge.edge_client.federation import clientapp
from fedge.edge_client.federation.launcher import ForkExecutor


def _age_and_elapsed(forked_at: float, out) -> None:
    out.send((clientapp._since_process_start(), time.time() - forked_at))


def test_a_forked_process_reports_its_own_age_not_its_parents():
    """The ClientApp module is imported in the fork server, so its process age is read per message; and read from
    the kernel's clocks: psutil's create_time rounds the boot time to a whole second (0.5 s off on the VM the
    demo was measured on), more than a forked ClientApp's whole start."""
    time.sleep(0.3)  # this process (the fork's parent) is older than its child by at least this
    receive, send = multiprocessing.Pipe(duplex=False)
    forked_at = time.time()
    child = multiprocessing.get_context("fork").Process(target=_age_and_elapsed, args=(forked_at, send))
    child.start()
    age, elapsed = receive.recv()
    child.join()
    # the child's age is the time since the fork, to the kernel's tick (10 ms) and a little scheduling
    assert 0 <= age <= elapsed + 0.03, (age, elapsed)


class _Spec:
    def __init__(self, task_type):
        self.task_type, self.task_id = task_type, 7


def test_other_task_types_go_to_flowers_own_subprocess_executor(monkeypatch):
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import LaunchResult

    executor = ForkExecutor([])
    handed = []
    monkeypatch.setattr(executor.others, "launch", lambda spec: handed.append(spec) or LaunchResult.accepted())
    spec = _Spec(TaskType.SERVER_APP)
    assert executor.launch(spec).status == "accepted"
    assert handed == [spec] and executor.running == []


def test_finished_clientapp_processes_are_let_go_and_running_ones_stopped_on_close():
    executor = ForkExecutor([])
    done = executor.context.Process(target=time.sleep, args=(0,))
    done.start()
    done.join()
    executor.running.append(done)
    executor.reconcile()
    assert executor.running == []
    busy = executor.context.Process(target=time.sleep, args=(600,))
    busy.start()
    executor.running.append(busy)
    executor.close()  # the launcher goes (its node did): what still runs is stopped
    busy.join(30)
    assert busy.exitcode == -15


@pytest.mark.parametrize("value", ["0", "61", "nan"])
def test_a_poll_interval_out_of_range_is_refused(value, capsys):
    from fedge.edge_client.federation.launcher import main

    with pytest.raises(SystemExit) as exit_:
        main(["--runtime-api-address", "127.0.0.1:1", "--poll-interval", value])
    assert exit_.value.code == 2 and "--poll-interval" in capsys.readouterr().err


def test_the_launcher_fits_the_installed_flower():
    """Every Flower name the launcher uses, public or private, is where it expects: this fails on a Flower that
    moved one (then `fedge client start` falls back to Flower's own process start, below)."""
    from fedge.edge_client.federation.launcher import main, misfit

    assert misfit() is None
    with pytest.raises(SystemExit) as exit_:
        main(["--check"])
    assert exit_.value.code == 0


def test_the_installed_flower_is_within_the_range_fedge_declares():
    """The tests run on a Flower that pyproject.toml admits (CI installs the newest one it admits)."""
    import tomllib
    from importlib.metadata import version
    from pathlib import Path

    from packaging.requirements import Requirement

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    flwr = next(Requirement(d) for d in project["dependencies"] if d.startswith("flwr"))
    assert flwr.specifier.contains(version("flwr")), (version("flwr"), str(flwr.specifier))


@pytest.mark.parametrize("change", ["no get_executor", "spec field", "clientapp argument", "module gone"])
def test_a_flower_that_moved_what_the_launcher_uses_is_named_in_one_line(change, monkeypatch, capsys):
    import dataclasses
    import sys

    import flwr.supercore.superexec.executor.types as types
    import flwr.supercore.superexec.run_superexec as loop
    import flwr.supernode.runtime.run_clientapp as runtime

    from fedge.edge_client.federation.launcher import MISFIT_EXIT, main, misfit

    if change == "no get_executor":
        monkeypatch.delattr(loop, "get_executor")
        expected = "run_superexec no longer picks its executor by get_executor"
    elif change == "spec field":
        fields = [(f.name, f.type) for f in dataclasses.fields(types.ExecutionSpec) if f.name != "token"]
        monkeypatch.setattr(types, "ExecutionSpec", dataclasses.make_dataclass("ExecutionSpec", fields))
        expected = "ExecutionSpec has changed (no token there)"
    elif change == "clientapp argument":
        monkeypatch.setattr(runtime, "run_clientapp", lambda runtime_api_address, token, insecure: None)
        expected = "run_clientapp has changed (no certificates, parent_pid, runtime_dependency_install there)"
    else:
        monkeypatch.setitem(sys.modules, "flwr.supercore.superexec.executor.types", None)
        expected = "cannot import flwr.supercore.superexec.executor.types"
    assert misfit() == expected
    with pytest.raises(SystemExit) as exit_:
        main(["--runtime-api-address", "127.0.0.1:1"])  # a real start says so too, and starts nothing
    out = capsys.readouterr().out
    assert exit_.value.code == MISFIT_EXIT and out.startswith("fedge's ClientApp launcher does not fit Flower 1.")
    assert out.strip().endswith(expected) and len(out.strip().splitlines()) == 1


def test_a_client_on_a_flower_the_launcher_does_not_fit_starts_clientapps_as_flower_does(tmp_path, monkeypatch):
    """The launcher checks itself as it starts (nothing is paid before the node starts); one that exits with
    MISFIT_EXIT makes `fedge client start` say why in one line and run the node as Flower runs it (Flower's own
    ClientApp processes), instead of restarting the launcher."""
    import os
    import sys

    from fedge.edge_client.federation import launcher as launcher_module
    from fedge.edge_client.federation import service
    from fedge.edge_client.federation.service import ClientSettings, Supervisor
    from fedge.edge_client.federation.settings import Device

    nodes = []  # the launcher flag of each node command built

    def node_command(client, device, runtime_port=None, launcher=None):
        nodes.append(service.uses_launcher(client) if launcher is None else launcher)
        return [sys.executable, "-c", "import time; time.sleep(600)"], dict(os.environ)

    why = "fedge's ClientApp launcher does not fit Flower 9.9: run_superexec no longer picks its executor"
    monkeypatch.setattr(service, "supernode_command", node_command)
    monkeypatch.setattr(service, "launcher_command", lambda *a, **k: [sys.executable, "-c", "raise SystemExit(3)"])
    monkeypatch.setattr(launcher_module, "misfit_here", lambda env: why)
    said = []
    client = ClientSettings("127.0.0.1:9092", model="none", worker=False)
    sup = Supervisor(client, Device(data="demo:iot", state_dir=tmp_path / "state"), said.append, tmp_path / "log")
    assert sup.launcher_on and nodes == [True] and said == []
    try:
        sup.start()
        first = sup.node
        end = time.monotonic() + 30
        while sup.launcher_on and time.monotonic() < end:
            sup.tick(time.monotonic())
            time.sleep(0.2)
        assert not sup.launcher_on and nodes == [True, False] and sup.launcher is None
        assert first.poll() is not None and sup.node is not first and sup.node.poll() is None
        assert said[-1] == f"{why}; ClientApps start as Flower starts them (as with --no-launcher)", said
        assert not any("launcher exited" in m for m in said), said  # not restarted as if it had crashed
    finally:
        sup.stop()


def test_the_check_in_its_own_process_reports_a_misfit_in_one_line(tmp_path):
    """misfit_here runs ``--check`` under the environment the launcher will have: a Flower it cannot import (an
    empty package shadowing it) is reported, not raised."""
    import os

    from fedge.edge_client.federation.launcher import misfit_here

    assert misfit_here(dict(os.environ)) is None
    (tmp_path / "flwr").mkdir()
    (tmp_path / "flwr" / "__init__.py").write_text("")
    why = misfit_here({**os.environ, "PYTHONPATH": str(tmp_path)})
    assert why is not None and why.startswith("fedge's ClientApp launcher") and "\n" not in why, why


def test_the_fork_server_starts_with_the_first_clientapp_and_stops_when_idle():
    """A waiting device does not hold the fork server (~93 MB) nor its resource tracker: they start with the first
    ClientApp, stay while ClientApps run or ran within idle_s, and start again with the next one."""
    import os
    from multiprocessing import forkserver

    from fedge.edge_client.federation.launcher import fork_server_running, stop_fork_server

    if fork_server_running():  # an earlier test's (the fork server is one per process)
        stop_fork_server()
    executor = ForkExecutor([], idle_s=3600)
    assert not fork_server_running()  # a new executor starts none
    try:
        for _ in range(2):
            busy = executor.context.Process(target=time.sleep, args=(0.5,))
            busy.start()
            executor.running.append(busy)
            server = forkserver._forkserver._forkserver_pid
            assert fork_server_running() and server is not None
            executor.reconcile()  # running: kept
            busy.join()
            executor.reconcile()  # just finished: within idle_s, kept
            assert fork_server_running() and executor.running == []
            executor.idle_s = 0
            executor.reconcile()  # idle: stopped, and its process is gone
            assert not fork_server_running()
            with pytest.raises(ChildProcessError):
                os.waitpid(server, os.WNOHANG)
            executor.idle_s = 3600
    finally:
        executor.close()
