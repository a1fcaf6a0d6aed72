"""The strategy's stage loop on a fake grid: replies, errors and silence, each failure naming its client."""

from __future__ import annotations

from types import SimpleNamespace

from fedge.common import wire
from fedge.server.settings import ServerSettings
from fedge.server.strategy import FedgeAvg


class FakeGrid:
    """Nodes 1..3: node 1 always replies, node 2 replies once then errors, node 3 replies once then goes silent."""

    def __init__(self) -> None:
        self.stage = 0

    def push_messages(self, messages: list) -> list[str]:
        for m in messages:
            m.metadata.message_id = f"s{self.stage}-n{m.metadata.dst_node_id}"
        self.stage += 1
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, ids: list[str]) -> list:
        out = []
        for mid in ids:
            node = int(mid.rsplit("-n", 1)[1])
            later = not mid.startswith("s0-")
            if later and node == 3:
                continue  # silent: the deadline passes
            error = SimpleNamespace(reason="RoundDeclined: no plan fits") if later and node == 2 else None
            out.append(
                SimpleNamespace(
                    metadata=SimpleNamespace(reply_to_message_id=mid, src_node_id=node),
                    content={wire.CLIENT: {wire.Client.NAME: f"client-{node}"}},
                    error=error,
                    has_error=lambda error=error: error is not None,
                )
            )
        return out


def _messages() -> list:
    return [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=n, message_id="")) for n in (1, 2, 3)]


def test_failures_name_the_node_and_its_client():
    strategy, grid = FedgeAvg(ServerSettings(min_clients=1, server_lr=1.0), stage_deadline_s=0.01), FakeGrid()
    replies, failures = strategy._stage(grid, _messages())
    assert len(replies) == 3 and failures == []
    replies, failures = strategy._stage(grid, _messages())
    assert [r.metadata.src_node_id for r in replies] == [1]
    assert {(f.node_id, f.name, f.reason) for f in failures} == {
        (2, "client-2", "RoundDeclined: no plan fits"),
        (3, "client-3", "no reply before the deadline"),
    }


def test_a_declined_round_is_told_apart_from_a_failure():
    from fedge.server.records import Failure, RoundRecord

    declined = Failure.from_error(
        3,
        "pi-1",
        "<class 'fedge.edge_client.federation.limits.RoundDeclined'>:<'not eligible: power: on battery at 34%'>",
    )
    assert declined == Failure(3, "pi-1", "not eligible: power: on battery at 34%", declined=True)
    crashed = Failure.from_error(4, None, "<class 'ZeroDivisionError'>:<'division by zero'>")
    assert crashed.reason == "ZeroDivisionError: division by zero" and not crashed.declined
    assert Failure.from_error(5, None, "node unavailable").reason == "node unavailable"
    record = RoundRecord.summarize(1, [], [], [declined, crashed], 1.0)
    assert (record.clients_failed, record.clients_declined) == (2, 1)


def test_a_client_that_declined_is_asked_back_after_its_window_and_the_window_survives_a_restart(tmp_path):
    import time

    import pytest

    from fedge.server.records import Failure
    from fedge.server.state import ServerState

    strategy = FedgeAvg(ServerSettings(min_clients=1, retry_after=60.0), stage_deadline_s=0.01)
    state, grid = ServerState(settings={}), FakeGrid()
    grid.get_node_ids = lambda: [1, 2, 3]
    declined = Failure(2, "pi", "not eligible: heat", declined=True)
    assert strategy._ask_back(state, [declined, Failure(3, None, "no reply before the deadline")]) == {2}
    assert declined.retry_after_s == 60.0
    skip = strategy._wait_for_eligible(grid, state)
    assert skip == {2}
    replies, _ = strategy._stage(grid, _messages(), skip)
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 3]  # node 2 was not sent the round

    state.save(tmp_path)
    resumed = ServerState.load(tmp_path)
    assert strategy._wait_for_eligible(grid, resumed) == {2}
    resumed.strategy["retry_at"].update({"2": time.time() - 1, "junk": "x", "3": "soon"})  # closed, and garbage
    assert strategy._wait_for_eligible(grid, resumed) == set() and resumed.strategy["retry_at"] == {}

    # Every connected node in its window: the round waits for the first window to close, it does not run empty.
    grid.get_node_ids = lambda: [2]
    resumed.strategy["retry_at"] = {"2": time.time() + 0.3}
    assert strategy._wait_for_eligible(grid, resumed) == set()
    with pytest.raises(ValueError, match="retry_after"):
        ServerSettings(retry_after=-1)
    assert FedgeAvg(ServerSettings(), 0.01)._ask_back(state, [declined]) == set()  # off by default


def test_eval_every_scores_every_nth_round_and_the_last(monkeypatch):
    import numpy as np

    from fedge.server.records import RoundRecord
    from fedge.server.state import ServerState

    settings = ServerSettings(min_clients=1, eval_every=3, eval_in_train=False)
    strategy, stages = FedgeAvg(settings, stage_deadline_s=0.01), []
    monkeypatch.setattr(strategy, "configure_train", lambda rnd, *a: [("train", rnd)])
    monkeypatch.setattr(strategy, "configure_evaluate", lambda rnd, *a: [("evaluate", rnd)])
    monkeypatch.setattr(strategy, "_stage", lambda grid, msgs, *rest: (stages.extend(msgs), ([], []))[1])
    monkeypatch.setattr(strategy, "_check_and_average", lambda *a: [])
    monkeypatch.setattr(strategy, "_wait_for_eligible", lambda grid, state: set())
    state = ServerState(settings={}, arrays={"a": np.zeros(2, np.float32)}, records=[RoundRecord(0)])
    config = wire.RoundSettings(model="m").to_config()
    strategy.run(None, state, 7, config, config, save=lambda s: None)
    assert [r for kind, r in stages if kind == "evaluate"] == [3, 6, 7]
    assert [r for kind, r in stages if kind == "train"] == list(range(1, 8))
    assert [rec.exact_match for rec in state.records[1:]] == [None] * 7 and state.round == 7


def _train_reply(node: int, metrics: dict):
    from flwr.app import ConfigRecord, MetricRecord

    return SimpleNamespace(
        metadata=SimpleNamespace(src_node_id=node),
        content={wire.CLIENT: ConfigRecord({wire.Client.NAME: f"client-{node}"}), wire.METRICS: MetricRecord(metrics)},
    )


def test_eval_in_train_scores_each_adapter_in_the_next_rounds_train_replies(monkeypatch):
    """With eval_in_train (the default) round r's train message asks the clients to score the adapter they receive
    (round r - 1's) first; their figures fill round r - 1's record, and only the last round has an evaluate stage."""
    import numpy as np

    from fedge.server.state import ServerState

    strategy, stages = FedgeAvg(ServerSettings(min_clients=1, eval_every=2), stage_deadline_s=0.01), []
    monkeypatch.setattr(strategy, "configure_train", lambda rnd, arrays, config, grid: [("train", rnd, dict(config))])
    monkeypatch.setattr(strategy, "configure_evaluate", lambda rnd, *a: [("evaluate", rnd, {})])
    prior = wire.Metric.PRIOR

    def stage(grid, msgs, skip=frozenset(), state=None):
        stages.extend(msgs)
        kind, rnd, config = msgs[0]
        if kind == "evaluate" or config.get(wire.Cfg.SCORE_FIRST) != 1:
            return [], []
        return [
            _train_reply(1, {prior + wire.Metric.EXACT_MATCH: rnd / 10, prior + wire.Metric.EVAL_EXAMPLES: 10}),
            _train_reply(2, {prior + wire.Metric.EXACT_MATCH: 3.0}),  # impossible: that client's evaluation fails
            _train_reply(3, {wire.Metric.EXAMPLES: 5}),  # no evaluation at all: a failure of the evaluation too
        ], []

    monkeypatch.setattr(strategy, "_stage", stage)
    monkeypatch.setattr(strategy, "_check_and_average", lambda *a: [])
    monkeypatch.setattr(strategy, "_wait_for_eligible", lambda grid, state: set())
    state, saved = ServerState(settings={}, arrays={"a": np.zeros(2, np.float32)}, records=[]), []
    config = wire.RoundSettings(model="m", eval_examples=10).to_config()
    strategy.run(None, state, 5, config, config, save=lambda s: saved.append([r.exact_match for r in s.records]))
    trains = [(rnd, c.get(wire.Cfg.SCORE_FIRST)) for kind, rnd, c in stages if kind == "train"]
    assert trains == [(1, 1), (2, None), (3, 1), (4, None), (5, 1)]  # scores rounds 0, 2, 4 (eval_every 2)
    assert [rnd for kind, rnd, _ in stages if kind == "evaluate"] == [5]  # the last round: its own stage
    assert [r.round for r in state.records] == [0, 1, 2, 3, 4, 5]
    # round r - 1's record holds what round r's replies said: client 1's score, the bad and the missing one failed
    assert [r.exact_match for r in state.records] == [0.1, None, 0.3, None, 0.5, None]
    assert saved[0] == [None] and saved[1] == [0.1, None]  # the base record, then filled in with round 1
    base = state.records[0]
    assert base.clients[0].eval_examples == 10 and base.clients_failed == 2
    assert {f.name for f in base.failures} == {"client-2", "client-3"}
    assert "not a fraction" in " ".join(f.reason for f in base.failures)


def test_scoring_a_record_again_replaces_its_earlier_evaluation_failures():
    # A server that crashed after saving an amended record scores that round again on resume: its failures once.
    from fedge.server.records import PRIOR_FAILURE, Failure, RoundRecord

    timed_out = Failure(9, "slow", "no reply before the deadline")
    bad = Failure(2, "client-2", f"{PRIOR_FAILURE}: exact-match 3 is not a fraction in [0, 1]")
    first = RoundRecord(4, failures=[timed_out]).with_evaluations([], [bad])
    again = first.with_evaluations([], [bad])
    assert again.failures == [timed_out, bad] and again.clients_failed == 2


def test_frozen_lora_a_goes_to_each_node_until_it_says_it_holds_it_then_only_b(monkeypatch):
    """With A frozen (the default) a node is sent A until a reply of its names A's fingerprint (it kept it);
    afterwards B and the fingerprint only. A node that failed for want of A, or whose reply no longer names it
    (it could not keep it), is sent A again; a decline or a late reply says nothing either way."""
    import json

    import numpy as np
    from flwr.app import ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    from fedge.common.lora import A_SUFFIX
    from fedge.server.records import Failure
    from fedge.server.state import ServerState

    monkeypatch.setattr(TaskIdentity, "_run_id", 7)  # Flower makes messages inside a ServerApp run, on its node
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    connected = [1, 2, 3]
    grid = SimpleNamespace(get_node_ids=lambda: connected)
    arrays = {
        "m.q_proj.lora_A.weight": np.ones((4, 8), np.float32), "m.q_proj.lora_B.weight": np.zeros((8, 4), np.float32),
    }  # fmt: skip
    digest = wire.fingerprint({k: v for k, v in arrays.items() if k.endswith(A_SUFFIX)})
    strategy = FedgeAvg(ServerSettings(min_clients=1), stage_deadline_s=0.01)
    state = ServerState(settings={}, arrays=arrays)
    config = wire.RoundSettings(model="m").to_config()

    def send(rnd: int) -> dict[int, bool]:
        messages, sizes = strategy._messages(strategy.configure_train, rnd, state, config, grid)
        with_a = {}
        for m in messages:
            assert m.content[wire.CONFIG][wire.Cfg.LORA_A] == digest
            with_a[m.metadata.dst_node_id] = any(
                k.endswith(A_SUFFIX) for k in wire.from_record(m.content[wire.ADAPTER])
            )
            full = sizes[m.metadata.dst_node_id] == wire.record_bytes(wire.to_record(arrays))
            assert full == with_a[m.metadata.dst_node_id]  # bytes down as sent: the whole adapter, or B only
        return with_a

    def reply(node: int, holds: str | None = digest):
        record = ConfigRecord({wire.Client.NAME: f"c{node}", **({wire.Client.LORA_A: holds} if holds else {})})
        return SimpleNamespace(metadata=SimpleNamespace(src_node_id=node), content={wire.CLIENT: record})

    assert send(1) == {1: True, 2: True, 3: True}
    strategy._learn_holders(state, [reply(1), reply(2), reply(3, holds=None)], [])  # 3 could not keep it
    assert send(2) == {1: False, 2: False, 3: True}
    from fedge.edge_client.federation.frozen_a import MissingLoraA

    why = str(MissingLoraA("not held on this node"))
    # as Flower's deployment says it
    deployed = f"<class 'fedge.edge_client.federation.frozen_a.MissingLoraA'>:<'{why}'>"
    strategy._learn_holders(
        state, [reply(2), reply(3, holds="0123456789abcdef")], [Failure.from_error(1, None, deployed)]
    )
    assert send(3) == {1: True, 2: False, 3: True}
    strategy._learn_holders(state, [reply(1)], [])
    simulated = f"<class 'flwr.clientapp.client_app.ClientAppException'>:<'Exception occurred. Message: {why}'>"
    strategy._learn_holders(state, [], [Failure.from_error(1, None, simulated)])  # Flower's simulation: text only
    assert send(3) == {1: True, 2: False, 3: True}
    strategy._learn_holders(state, [reply(3)], [])
    assert send(4) == {1: True, 2: False, 3: False}
    strategy._learn_holders(state, [], [
        Failure(2, None, "not eligible: on battery", declined=True), Failure(3, None, "no reply before the deadline"),
    ])  # fmt: skip
    assert send(5) == {1: True, 2: False, 3: False}  # neither a decline nor a late reply loses A
    # a reply whose client record is of the wrong kind, or names A with something that is no fingerprint: no A
    odd = SimpleNamespace(metadata=SimpleNamespace(src_node_id=3), content={wire.CLIENT: "not a record"})
    strategy._learn_holders(state, [odd, reply(2, holds=["a", "list"])], [])
    assert send(6) == {1: True, 2: True, 3: True}
    strategy._learn_holders(state, [reply(2), reply(3)], [])
    connected.remove(2)  # node 2 leaves (a rejoin is a new node id): forgotten, not kept in the state for ever
    send(7)
    assert state.strategy["lora_a"] == {"digest": digest, "nodes": [3]}
    json.dumps(state.strategy)  # saved in state.json with the rest: it survives a restart
    # A that trains (lora_freeze_a off) goes to every node, every time
    config = wire.RoundSettings(model="m", lora_freeze_a=False).to_config()
    messages, _ = strategy._messages(strategy.configure_train, 8, state, config, grid)
    assert all(wire.Cfg.LORA_A not in m.content[wire.CONFIG] for m in messages)
    assert all("m.q_proj.lora_A.weight" in wire.from_record(m.content[wire.ADAPTER]) for m in messages)


def test_a_failure_reason_is_one_line_and_a_traceback_goes_to_the_log(caplog):
    """What a device owner reads in the records and the table is one line; the traceback a custom ClientApp (or an
    old worker) sent is the last line's exception and message, and the whole text is in the server's log."""
    import logging

    from fedge.server.records import Failure

    caplog.set_level(logging.INFO, logger="fedge.server")
    traceback_text = (
        'Traceback (most recent call last):\n  File "worker.py", line 90, in _handle\n    arrays = do_train()\n'
        "fedge.edge_client.federation.limits.RoundDeclined: pi4: no training plan fits this round (memory)\n"
    )
    failed = Failure.from_error(7, "pi4", f"<class 'RuntimeError'>:<'the worker failed: {traceback_text}'>")
    assert "\n" not in failed.reason and "Traceback" not in failed.reason and "no training plan fits" in failed.reason
    assert 'File "worker.py"' in caplog.text
    declined = Failure.from_error(7, "pi4", "<class 'x.RoundDeclined'>:<'pi4: heat: 91 C\n(sensor hwmon2)'>")
    assert declined.declined and "\n" not in declined.reason
    assert Failure.from_error(8, None, "node\nunavailable").reason == "unavailable"
