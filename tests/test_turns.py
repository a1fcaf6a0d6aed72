"""Machine-wide turns (fedge.edge_client.federation.turns): at most N holders at once; a dead holder's turn is free."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from fedge.common import wire
from fedge.edge_client.federation import local_work
from fedge.edge_client.federation.settings import Device
from fedge.edge_client.federation.turns import parse_turns, turn

# A process that takes a turn, says so on stdout, and holds it until its stdin closes.
HOLDER = """
import sys
from fedge.edge_client.federation.turns import turn
with turn(sys.argv[1], poll_s=0.02):
    print("in", flush=True)
    sys.stdin.read()
"""


def _holder(spec: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, spec], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def _entered(proc: subprocess.Popen, wait_s: float) -> bool:
    """Whether ``proc`` reported holding its turn within ``wait_s`` (False means: still waiting)."""
    import select

    ready, _, _ = select.select([proc.stdout], [], [], wait_s)
    return bool(ready) and proc.stdout.readline().strip() == "in"


def test_at_most_n_hold_a_turn_and_the_next_goes_in_when_one_leaves(tmp_path):
    spec = f"{tmp_path / 'turns'}:2"
    first, second = _holder(spec), _holder(spec)
    third = None
    try:
        assert _entered(first, 30) and _entered(second, 30)
        third = _holder(spec)  # started once both turns are taken
        assert not _entered(third, 1.0)
        first.stdin.close()  # the first leaves its turn
        assert _entered(third, 30)
    finally:
        for proc in (first, second, third):
            if proc is not None:
                proc.kill()
                proc.wait()


def test_a_killed_holder_frees_its_turn(tmp_path):
    spec = f"{tmp_path / 'turns'}:1"
    holder = _holder(spec)
    assert _entered(holder, 30)
    holder.kill()  # no cleanup runs: the kernel drops the flock with the process
    holder.wait()
    got = threading.Event()

    def take() -> None:
        with turn(spec, poll_s=0.02):
            got.set()

    taker = threading.Thread(target=take, daemon=True)  # a regression waits forever: fail, do not hang
    taker.start()
    taker.join(30)
    assert got.is_set()


def test_client_start_makes_the_turns_directory_absolute(tmp_path, monkeypatch):
    # clients started from other working directories must lock the same files
    from fedge.edge_client.federation.service import prepare_device

    monkeypatch.chdir(tmp_path)
    device = prepare_device(Device("c", "demo:iot", state_dir=tmp_path / "s", turns="shared/turns:2"))
    assert device.turns == f"{tmp_path / 'shared' / 'turns'}:2"


def test_client_start_refuses_a_turns_directory_it_cannot_make(tmp_path):
    from fedge.common.errors import FedgeError
    from fedge.edge_client.federation.service import prepare_device

    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(FedgeError, match=r"--turns .*file/turns: cannot create"):
        prepare_device(Device("c", "demo:iot", state_dir=tmp_path / "s", turns=f"{tmp_path / 'file' / 'turns'}:2"))


@pytest.mark.parametrize("spec", ["turns", "dir:0", "dir:two", ":2", "dir:", "dir:\u00b2", "dir:9999999"])
def test_a_bad_turns_spec_says_what_is_expected(spec, tmp_path):
    with pytest.raises(ValueError, match=r"turns must be DIR:N"):
        parse_turns(spec)
    with pytest.raises(ValueError, match=r"turns must be DIR:N"):
        Device("c", "demo:iot", turns=spec, state_dir=tmp_path)


def test_a_rounds_work_waits_for_its_turn(tiny_model_dir, tmp_path):
    # do_evaluate (and do_train, through the same wrapper) starts only once this machine has a turn free.
    spec = f"{tmp_path / 'turns'}:1"
    device = Device("c", "demo:iot", "demo:iot:test", tmp_path / "state", tmp_path / "cache", "fp32", turns=spec)
    settings = wire.RoundSettings(model=str(tiny_model_dir), seq_len=64, lora_r=8, eval_examples=4)
    holder = local_work.ModelHolder(device.cache_dir, device.precision)
    arrays = holder.initial_adapter(settings.model, settings.lora(), settings.seed)
    done = threading.Event()
    other = _holder(spec)
    try:
        assert _entered(other, 30)
        worker = threading.Thread(target=lambda: (local_work.do_evaluate(holder, device, settings, arrays), done.set()))
        worker.start()
        time.sleep(1.0)
        assert not done.is_set()  # the other process holds the only turn
        other.stdin.close()
        worker.join(60)
        assert done.is_set()
    finally:
        other.kill()
        other.wait()
