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
