"""End to end over loopback with real processes: fedge server start, fedge client start, Flower in between.

A tiny random-init model keeps each round to seconds; everything else is the real thing: a SuperLink, one
SuperNode per client, a ClientApp process per message, kill -9 of clients and of the server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedge.common.procs import free_port
from fedge.server.state import ServerState, StateError, read_records

pytestmark = pytest.mark.federation
TESTS = Path(__file__).parent


class Federation:
    """Processes of one test federation, all killed at the end."""

    def __init__(
        self, tmp: Path, model_dir: Path, rounds: int, steps: int, min_clients: int = 2, cwd: Path | None = None,
        **server_args,
    ):  # fmt: skip
        self.tmp, self.model, self.rounds, self.port, self.cwd = tmp, model_dir, rounds, free_port(), cwd
        self.env = {
            **os.environ,
            "PYTHONPATH": f"{TESTS.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "FEDGE_CACHE": str(tmp / "cache"),
        }
        self.server_args = [
            "--model",
            str(model_dir),
            "--rounds",
            str(rounds),
            "--steps",
            str(steps),
            "--min-clients",
            str(min_clients),
            "--eval-examples",
            "8",
            "--rank",
            "4",
            "--state",
            str(tmp / "server"),
            "--address",
            f"127.0.0.1:{self.port}",
            *[str(a) for kv in server_args.items() for a in (f"--{kv[0].replace('_', '-')}", kv[1])],
        ]
        self.server: subprocess.Popen | None = None
        self.clients: dict[str, subprocess.Popen] = {}

    def _fedge(self, log: str, *args: str) -> subprocess.Popen:
        out = open(self.tmp / f"{log}.log", "ab")  # noqa: SIM115 (closed with the process)
        return subprocess.Popen(
            [sys.executable, "-m", "fedge", *args], env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd
        )

    def start_server(self) -> None:
        self.server = self._fedge("server", "server", "start", *self.server_args)

    def start_client(self, name: str, domain: str) -> None:
        self.clients[name] = self._fedge(
            f"client-{name}",
            "client",
            "start",
            "--server",
            f"127.0.0.1:{self.port}",
            "--data",
            f"demo:{domain}",
            "--eval-data",
            f"demo:{domain}:test",
            "--name",
            name,
            "--state",
            str(self.tmp / "clients" / name),
            "--threads",
            "1",
            "--model",
            str(self.model),
        )

    def records(self) -> list[dict]:
        """The round records as rounds.json holds them."""
        return [r.to_dict() for r in read_records(self.tmp / "server")]

    def wait_for_round(self, rnd: int, timeout: float = 600) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(r["round"] >= rnd for r in self.records()):
                return
            if self.server.poll() is not None:
                break
            time.sleep(0.5)
        pytest.fail(f"round {rnd} did not complete; server log:\n{self.log('server')}")

    def wait_for_training(self, name: str, rnd: int, timeout: float = 600) -> None:
        """Until client ``name`` trains in round ``rnd`` (its round's progress file says so)."""
        from fedge.edge_client.agent.hold import progress

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            now = progress(self.tmp / "clients" / name)
            if now and now["kind"] == "train" and now["round"] >= rnd:
                return
            if self.server.poll() is not None:
                break
            time.sleep(0.2)
        pytest.fail(f"{name} did not train in round {rnd}; server log:\n{self.log('server')}")

    def wait_for_state(self, rnd: int, timeout: float = 600) -> ServerState:
        """The server's saved state once it holds round ``rnd``: state.json is written last, so the round is saved
        in full (its record in rounds.json comes before)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                state = ServerState.load(self.tmp / "server")
            except StateError:  # read while a save replaced the arrays file state.json named: read again
                state = None
            if state is not None and state.round >= rnd:
                return state
            if self.server.poll() is not None:
                break
            time.sleep(0.2)
        pytest.fail(f"round {rnd} was not saved; server log:\n{self.log('server')}")

    def wait_server(self, timeout: float = 900) -> int:
        try:
            return self.server.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server did not finish; its log:\n{self.log('server')}")

    def log(self, name: str) -> str:
        return "\n".join((self.tmp / f"{name}.log").read_text(errors="replace").splitlines()[-40:])

    def close(self) -> None:
        for proc in [*self.clients.values(), self.server]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.clients.values(), self.server]:
            if proc is not None:
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()


@pytest.fixture
def federation(tmp_path, tiny_model_dir):
    made = []

    def make(**kwargs) -> Federation:
        made.append(Federation(tmp_path, tiny_model_dir, **kwargs))
        return made[-1]

    yield make
    for f in made:
        f.close()


def test_a_round_runs_from_a_directory_whose_files_are_named_like_fedges_folders(federation, tmp_path):
    # `python -m fedge` puts the working directory first on sys.path: a user's own server.py (or quantization.py,
    # edge_client.py) must not stand in for fedge's packages, in the CLI, the ServerApp, the ClientApp or the worker.
    cwd = tmp_path / "users-project"
    cwd.mkdir()
    for name in ("server", "quantization", "edge_client"):
        (cwd / f"{name}.py").write_text(f"raise SystemExit('the user\\'s {name}.py was imported')\n")
    fed = federation(rounds=1, steps=2, cwd=cwd)
    fed.start_server()
    fed.start_client("a", "healthcare")
    fed.start_client("b", "iot")
    assert fed.wait_server() == 0, fed.log("server")
    last = fed.records()[-1]
    assert last["round"] == 1 and last["clients_accepted"] == 2, last
    assert all(c.get("warm") == 1 for c in last["clients"]), "the warm worker did not do the round's work"
    for log in (tmp_path / "clients").rglob("*.log"):
        assert "was imported" not in log.read_text(errors="replace"), log
    for name in ("a", "b"):  # each message's ClientApp process was forked by fedge's launcher, not started afresh
        log = (tmp_path / f"client-{name}.log").read_text(errors="replace")
        assert "forked by fedge's launcher" in log and "Start `flwr-clientapp` process" not in log, log[-3000:]


def test_rounds_go_on_past_a_killed_client_and_poisoned_updates(federation):
    fed = federation(rounds=3, steps=30, min_clients=2, clientapp="tests.poison_clientapp:app")
    fed.start_server()
    for name, domain in (
        ("healthcare", "healthcare"),
        ("finance", "finance"),
        ("doomed", "iot"),
        ("poison", "education"),
    ):
        fed.start_client(name, domain)
    fed.wait_for_training("doomed", 1)  # round 1's train messages are out, and it is working on its own
    fed.clients["doomed"].send_signal(signal.SIGKILL)
    fed.wait_for_round(1)
    fed.start_client("doomed", "iot")  # it rejoins (as a new SuperNode) for the next rounds
    assert fed.wait_server() == 0, fed.log("server")

    records = fed.records()
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    by_round = {r["round"]: {c["name"]: c for c in r["clients"]} for r in records}
    expected = {1: ("non-finite",), 2: ("update norm",), 3: ("wrong shape", "LoRA ranks")}
    for rnd, reasons in expected.items():
        poisoned = by_round[rnd]["poison"]
        assert poisoned["accepted"] is False and any(r in poisoned["reason"] for r in reasons), poisoned
        assert by_round[rnd]["healthcare"]["accepted"] and by_round[rnd]["finance"]["accepted"]
        assert records[rnd]["clients_rejected"] == 1
    assert records[1]["clients_failed"] >= 1  # the killed client's message came back as "node unavailable"
    assert "doomed" not in {n for n, c in by_round[1].items() if c.get("accepted")}
    assert by_round[3]["doomed"]["accepted"]  # rejoined
    assert records[3]["heldout_loss"] < records[0]["heldout_loss"]
    # LoRA A (frozen) goes to a node until it has replied; then B only. The rejoined node is a new one: A again.
    full = by_round[1]["healthcare"]["bytes_down"]
    assert by_round[2]["healthcare"]["bytes_down"] < 0.75 * full and by_round[3]["finance"]["bytes_down"] < 0.75 * full
    rejoined = [by_round[r]["doomed"] for r in (2, 3) if by_round[r].get("doomed", {}).get("bytes_down")]
    assert rejoined and rejoined[0]["bytes_down"] == full, rejoined
    for c in by_round[2].values():
        if c.get("accepted"):
            assert c["steps"] == 30 and c["bytes_up"] > 0 and c["startup_seconds"] > 0 and c["load_seconds"] > 0
            assert c["warm"] == 1  # the client's warm worker did the work, with the model already loaded
    assert (fed.tmp / "server" / "final-adapter" / "adapter_config.json").is_file()


def test_replies_corrupted_in_transit_are_rejected_and_the_rounds_go_on(federation):
    """A client whose every reply is damaged on its way (random payload bytes, arrays cut short, broken .npy
    headers, an impossible exact match): each round completes with it rejected and the honest clients merged."""
    fed = federation(rounds=3, steps=3, min_clients=2, clientapp="tests.poison_clientapp:app")
    fed.start_server()
    for name, domain in (("healthcare", "healthcare"), ("finance", "finance"), ("garbled", "iot")):
        fed.start_client(name, domain)
    assert fed.wait_server() == 0, fed.log("server")

    records = fed.records()
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    expected = {
        1: ("non-finite", "update norm", "unreadable codec header"),
        2: ("bytes, ",),  # the .npy header says more bytes than arrived
        3: ("not a numpy array",),
    }
    for rnd, reasons in expected.items():
        by_name = {c["name"]: c for c in records[rnd]["clients"]}
        garbled = by_name["garbled"]
        assert garbled["accepted"] is False and any(r in garbled["reason"] for r in reasons), (rnd, garbled["reason"])
        assert by_name["healthcare"]["accepted"] and by_name["finance"]["accepted"], (rnd, records)
        assert records[rnd]["clients_accepted"] == 2 and records[rnd]["clients_rejected"] == 1
    for record in records:  # its evaluations are failures, never part of the round's exact match
        assert any(f["name"] == "garbled" and "exact-match" in f["reason"] for f in record["failures"]), record
        assert record["exact_match"] is None or 0 <= record["exact_match"] <= 1
    state = ServerState.load(fed.tmp / "server")
    assert state.round == 3 and all(np.isfinite(a).all() for a in state.arrays.values())
    assert "Traceback" not in (fed.tmp / "server.log").read_text(errors="replace")


def test_server_killed_mid_round_resumes_at_the_right_round(federation):
    fed = federation(rounds=3, steps=60)
    state_dir = (fed.tmp / "server").resolve()
    run_log = state_dir / "logs" / "run.log"  # the ServerApp's own output, as `flwr run --stream` shows it
    fed.start_server()
    fed.start_client("healthcare", "healthcare")
    fed.start_client("finance", "finance")
    fed.wait_for_state(1)  # round 1 is saved; round 2 is under way
    fed.server.send_signal(signal.SIGKILL)  # its SuperLink goes down with it; the ServerApp follows
    fed.server.wait()
    saved = ServerState.load(state_dir)
    assert saved.round == 1 and [r.round for r in saved.records] == [0, 1]
    before_kill = [r.to_dict() for r in saved.records]
    first_run = run_log.read_bytes()
    assert b"resuming from" not in first_run  # the first run started the federation
    time.sleep(2)
    fed.start_server()
    assert fed.wait_server() == 0, fed.log("server")

    resumed_run = run_log.read_bytes()[len(first_run) :].decode(errors="replace")
    assert f"resuming from {state_dir} after round 1" in resumed_run, resumed_run[-3000:]
    records = fed.records()
    assert [r["round"] for r in records] == [0, 1, 2, 3]  # nothing lost, nothing repeated
    # rounds 0 and 1 are the first run's, not run again; round 1's score came with round 2's replies, after the kill
    assert records[0] == before_kill[0] and before_kill[1]["heldout_loss"] is None
    assert {k: v for k, v in records[1].items() if k != "clients" and "exact" not in k and "heldout" not in k} == {
        k: v for k, v in before_kill[1].items() if k != "clients" and "exact" not in k and "heldout" not in k
    }
    losses = [r["heldout_loss"] for r in records]
    assert losses[3] < losses[1] < losses[0]  # it keeps improving after the restart
    assert ServerState.load(state_dir).round == 3


def test_bad_client_input_fails_fast_with_a_clear_message(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "response": "ok"}\nnot json\n')
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedge",
            "client",
            "start",
            "--server",
            "127.0.0.1:1",
            "--data",
            str(bad),
            "--model",
            "none",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "bad.jsonl:2: not valid JSON" in out.stderr
    assert "Traceback" not in out.stderr
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedge",
            "client",
            "start",
            "--server",
            "nonsense",
            "--data",
            "demo:iot",
            "--model",
            "none",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "--server 'nonsense'" in out.stderr


def test_server_refuses_a_state_dir_of_another_federation(tmp_path):
    import numpy as np

    ServerState(
        {"model": "other", "lora_r": 4, "lora_targets": "q_proj", "seed": 0}, 1, {"x": np.zeros(2, np.float32)}
    ).save(tmp_path / "state")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedge",
            "server",
            "start",
            "--state",
            str(tmp_path / "state"),
            "--model",
            "smollm2-135m",
            "--rank",
            "4",
            "--targets",
            "q_proj",
            "--address",
            f"127.0.0.1:{free_port()}",  # loopback: plaintext is allowed there
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "different federation" in out.stderr and "model" in out.stderr
    assert json.loads((tmp_path / "state" / "state.json").read_text())["round"] == 1  # untouched


def test_tls_and_supernode_authentication(federation, tmp_path):
    from tests.certs import make_node_key, make_tls

    ca, cert, key = make_tls(tmp_path / "tls")
    allowed_key, allowed_pub = make_node_key(tmp_path / "tls", "allowed")
    stranger_key, _ = make_node_key(tmp_path / "tls", "stranger")
    fed = federation(
        rounds=1, steps=3, min_clients=1, ssl_certfile=cert, ssl_keyfile=key, ssl_ca_certfile=ca, auth_key=allowed_pub
    )
    fed.start_server()
    tls = ["--root-certificates", str(ca)]
    fed.clients["allowed"] = fed._fedge(
        "client-allowed",
        "client",
        "start",
        "--server",
        f"127.0.0.1:{fed.port}",
        "--data",
        "demo:iot",
        "--name",
        "allowed",
        "--state",
        str(tmp_path / "c1"),
        "--threads",
        "1",
        "--model",
        "none",
        *tls,
        "--auth-key",
        str(allowed_key),
    )
    fed.clients["stranger"] = fed._fedge(
        "client-stranger",
        "client",
        "start",
        "--server",
        f"127.0.0.1:{fed.port}",
        "--data",
        "demo:iot",
        "--name",
        "stranger",
        "--state",
        str(tmp_path / "c2"),
        "--threads",
        "1",
        "--model",
        "none",
        *tls,
        "--auth-key",
        str(stranger_key),
    )
    assert fed.wait_server() == 0, fed.log("server")
    names = {c["name"] for r in fed.records() for c in r["clients"]}
    assert names == {"allowed"}  # the unregistered key never joined


def test_simulation_engine_runs_the_same_apps(tmp_path, tiny_model_dir):
    """`fedge demo --simulation 2`: Flower's simulation engine (Ray) with fedge's ServerApp and ClientApp."""
    out = tmp_path / "sim"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedge",
            "--cache-dir",
            str(tmp_path / "cache"),
            "demo",
            "--simulation",
            "2",
            "--rounds",
            "1",
            "--steps",
            "3",
            "--eval-examples",
            "4",
            "--rank",
            "4",
            "--model",
            str(tiny_model_dir),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    assert report["rounds"][1]["clients_accepted"] == 2
    assert {c["name"] for c in report["rounds"][1]["clients"]} == {"healthcare-0", "finance-1"}


def test_demo_with_emulated_devices_plans_and_encodes_each_clients_round(tmp_path, tiny_model_dir):
    """`fedge demo --devices`: two emulated devices plan their rounds to the deadline and send encoded changes.

    The planner's cost model is SmolLM2's, so the plans do not fit the tiny model's real cost; what is checked
    is the wiring: profiles reach the clients, plans and codecs come back, encoded updates merge.
    """
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "fedge", "--cache-dir", str(tmp_path / "cache"), "demo",
           "--devices", "base=laptop", "--devices", "base=pi5-8gb,slowdown=2", "--deadline", "120", "--codec", "auto",
           "--rounds", "2", "--steps", "4", "--eval-examples", "4", "--rank", "4", "--model", str(tiny_model_dir),
           "--out", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{TESTS.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
    assert report["devices"] == ["base=laptop", "base=pi5-8gb,slowdown=2"]
    for rnd in report["rounds"][1:]:
        assert rnd["clients_accepted"] == 2 and rnd["clients_failed"] == 0, rnd
        by_profile = {c["device_profile"]: c for c in rnd["clients"]}
        assert set(by_profile) == {"laptop", "pi5-8gb"}
        for c in by_profile.values():
            assert c["plan"]["feasible"] and c["plan"]["precision"] and c["steps"] >= 1
            assert c["codec"] and c["deadline_s"] == 120 and c["warm"] == 1
            assert 0 < c["bytes_up"] < c["bytes_down"]  # the encoded change, smaller than the fp32 adapter sent
    assert "steps" in done.stdout and "pi5-8gb" in done.stdout  # the live table's per-client plan lines
