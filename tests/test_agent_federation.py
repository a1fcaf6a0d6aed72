"""The background agent against a real server on loopback: a real `fedge agent run` process beside a plain client,
its run conditions read from a file the test flips (RunConditions.source)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.test_federation import Federation

pytestmark = pytest.mark.federation


def _readings(path, **ok) -> None:
    path.write_text(json.dumps({name: [value, f"test says {value}"] for name, value in ok.items()}))


def _agent_rounds(fed: Federation, name: str) -> list[tuple[int, str]]:
    """(round, what happened to the agent's client): "accepted", "rejected", "declined: REASON" or "failed"."""
    out = []
    for record in fed.records():
        for c in record["clients"]:
            if c["name"] == name and c.get("accepted") is not None:
                out.append((record["round"], "accepted" if c["accepted"] else "rejected"))
        for f in record["failures"]:
            if f["name"] == name or (f["name"] is None and f["reason"].startswith(f"{name}: ")):
                out.append((record["round"], f"declined: {f['reason']}" if f.get("declined") else "failed"))
    return out


def _wait_for(fed: Federation, name: str, want, timeout: float = 400) -> list:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        seen = _agent_rounds(fed, name)
        if any(want(what) for _, what in seen):
            return seen
        if fed.server.poll() is not None:
            break
        time.sleep(1)
    pytest.fail(f"the agent never got to that; it saw {_agent_rounds(fed, name)}\n{fed.log('server')}")


def test_the_agent_declines_trains_pauses_and_rejoins_after_kill_9(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    fed = Federation(tmp_path, tiny_model_dir, rounds=40, steps=2, min_clients=1, stage_deadline=900, retry_after=15)
    fed.env["XDG_RUNTIME_DIR"] = str(tmp_path / "run")
    readings = tmp_path / "readings.json"
    _readings(readings, power=False, network=True)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[client]\nserver = "127.0.0.1:{fed.port}"\nmodel = "{tiny_model_dir}"\n\n'
        f'[device]\nname = "pi"\ndata = "demo:iot"\neval_data = "demo:iot:test"\nthreads = 1\n'
        f'state_dir = "{tmp_path / "pi"}"\n\n[conditions]\nsource = "{readings}"\n\n'
        "[agent]\ncheck_every = 1.0\nunload_after = 0.0\nsleep_after = 40.0\n"
    )

    def start_agent() -> subprocess.Popen:
        return fed._fedge("agent-pi", "agent", "run", "--config", str(config))

    def talk(cmd: str) -> dict:
        args = [sys.executable, "-m", "fedge", "agent", cmd, "--config", str(config)]
        done = subprocess.run(args + (["--json"] if cmd == "status" else []), env=fed.env, capture_output=True,
                              text=True, timeout=30)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout) if cmd == "status" else {}

    try:
        fed.start_server()
        fed.start_client("a", "healthcare")
        fed.clients["pi"] = start_agent()
        # Not eligible: every round it is sent, it declines at once with the reason (no stage waits 900 s for it).
        _wait_for(fed, "pi", lambda what: what.startswith("declined: pi: not eligible: power"))
        status = talk("status")
        assert status["state"] == "waiting" and "power" in status["reason"], status
        assert [r["ok"] for r in status["readings"]] == [False, True]

        _readings(readings, power=True, network=True)  # conditions return: it trains
        _wait_for(fed, "pi", lambda what: what == "accepted")

        talk("pause")  # the owner pauses it
        _wait_for(fed, "pi", lambda what: what == "declined: pi: not eligible: paused by the owner")
        talk("resume")
        accepted = sum(1 for _, what in _agent_rounds(fed, "pi") if what == "accepted")

        fed.clients["pi"].send_signal(signal.SIGKILL)  # kill -9: its SuperNode dies with it; a new agent rejoins
        fed.clients["pi"].wait(30)
        fed.clients["pi"] = start_agent()
        _wait_for(fed, "pi", lambda what: what == "accepted" and accepted < sum(
            1 for _, w in _agent_rounds(fed, "pi") if w == "accepted"))  # fmt: skip
        assert talk("status")["state"] in ("ready", "training", "evaluating")

        # Held back for longer than sleep_after: its SuperNode leaves, and the server runs rounds without it (a
        # stage would wait 900 s for a node it still counted); conditions back: it rejoins and trains.
        _readings(readings, power=False, network=True)
        end = time.monotonic() + 120
        while talk("status")["state"] != "asleep" and time.monotonic() < end:
            time.sleep(1)
        status = talk("status")
        assert status["state"] == "asleep" and status["node"].startswith("left"), status
        asleep_from = max(r["round"] for r in fed.records())
        fed.wait_for_round(asleep_from + 2, timeout=120)
        accepted = sum(1 for _, what in _agent_rounds(fed, "pi") if what == "accepted")
        _readings(readings, power=True, network=True)
        _wait_for(fed, "pi", lambda what: what == "accepted" and accepted < sum(
            1 for _, w in _agent_rounds(fed, "pi") if w == "accepted"))  # fmt: skip
        talk("stop")
        assert fed.clients["pi"].wait(60) == 0
        assert not (tmp_path / "pi" / "hold.json").exists()  # a stopped agent holds nothing back
    finally:
        fed.close()
    records = fed.records()
    declines = [f for r in records for f in r["failures"] if f["declined"]]
    assert declines and all(f["retry_after_s"] == 15 for f in declines)  # asked back in 15 s ...
    assert sum(r["clients_deferred"] for r in records) >= 1  # ... and not sent rounds meanwhile
    for record in records:  # the plain client trained every round, whatever the agent did
        assert any(c["name"] == "a" and c.get("accepted") for c in record["clients"]) or record["round"] == 0
