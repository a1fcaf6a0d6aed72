"""Crafted replies against the strategy's real code: each one is rejected with a reason, none raises, none moves or
poisons the global adapter, and the honest clients beside it are still merged.

The shapes are the ones an attacker with one SuperNode tried (issue "A server that no client can crash"): codec
headers of the wrong JSON type or absurd shapes, records of the wrong kind, lying example and step counts, plans
that are not plans, names that are not strings, metrics that are lists.
"""

from __future__ import annotations

import dataclasses
import io
import json
import zlib
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from fedge.common import wire
from fedge.quantization.codecs import HEADER_KEY, encode
from fedge.server import hetero
from fedge.server.records import ClientRound, RoundRecord
from fedge.server.settings import ServerSettings
from fedge.server.state import ServerState
from fedge.server.strategy import FedgeAvg

R, IN, OUT = 4, 6, 5
A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
SETTINGS = wire.RoundSettings(steps=10, lora_r=R, lora_alpha=2 * R)
SENT = defaultdict(lambda: 1)  # bytes each node was sent


def _global() -> dict:
    rng = np.random.default_rng(0)
    return {A: rng.standard_normal((R, IN)).astype(np.float32), B: np.zeros((OUT, R), np.float32)}


def _reply(node: int, arrays=None, metrics=None, client=None, adapter=None) -> SimpleNamespace:
    """A training reply as the strategy sees one: an adapter record, a metric record and a client record."""
    g = _global()
    arrays = arrays if arrays is not None else {A: g[A], B: g[B] + 0.01 * (node + 1)}
    content = {
        wire.ADAPTER: adapter if adapter is not None else wire.to_record(arrays),
        wire.METRICS: metrics if metrics is not None else MetricRecord({wire.Metric.EXAMPLES: 100, "steps": 10}),
        wire.CLIENT: client if client is not None else ConfigRecord({wire.Client.NAME: f"client-{node}"}),
    }
    return SimpleNamespace(content=content, metadata=SimpleNamespace(src_node_id=node))


def _header(header: object) -> dict:
    """An encoded reply whose codec header is ``header`` (any JSON), with an honest-looking payload."""
    ok = encode({B: np.full((OUT, R), 0.01, np.float32)}, "int8").to_arrays()
    blob = zlib.compress(json.dumps(header).encode())
    return {**ok, HEADER_KEY: np.frombuffer(blob, dtype=np.uint8)}


def _raw_header(blob: bytes) -> dict:
    return {**_header({}), HEADER_KEY: np.frombuffer(blob, dtype=np.uint8)}


HOSTILE = {
    "header is a list": lambda: _reply(9, arrays=_header([1, 2, 3])),
    "header is a string": lambda: _reply(9, arrays=_header("tensors")),
    "tensors is a dict": lambda: _reply(9, arrays=_header({"format": 1, "codec": "int8", "tensors": {"a": 1}})),
    "shape 1e400": lambda: _reply(9, arrays=_raw_header(zlib.compress(
        b'{"format": 1, "codec": "int8", "tensors": [["' + B.encode() + b'", [1e400, 4], "float32"]]}'))),
    "shape Infinity": lambda: _reply(9, arrays=_raw_header(zlib.compress(
        b'{"format": 1, "codec": "int8", "tensors": [["' + B.encode() + b'", [Infinity, 4], "float32"]]}'))),
    "deeply nested header": lambda: _reply(9, arrays=_raw_header(zlib.compress(b"[" * 100_000 + b"]" * 100_000))),
    "header bomb": lambda: _reply(9, arrays=_raw_header(zlib.compress(b" " * (64 << 20) + b"{}"))),
    "adapter of the wrong record type": lambda: _reply(9, adapter=ConfigRecord({"x": 1})),
    "negative examples": lambda: _reply(9, metrics=MetricRecord({wire.Metric.EXAMPLES: -5, "steps": 10})),
    "NaN examples": lambda: _reply(9, metrics=MetricRecord({wire.Metric.EXAMPLES: float("nan"), "steps": 10})),
    "1e12 examples": lambda: _reply(9, metrics=MetricRecord({wire.Metric.EXAMPLES: 1e12, "steps": 10})),
    "inf examples": lambda: _reply(9, metrics=MetricRecord({wire.Metric.EXAMPLES: float("inf"), "steps": 10})),
    "examples as a list": lambda: _reply(9, metrics=MetricRecord({wire.Metric.EXAMPLES: [1, 2], "steps": 10})),
    "no examples": lambda: _reply(9, metrics=MetricRecord({"steps": 10})),
    "NaN steps": lambda: _reply(9, metrics=MetricRecord({wire.Metric.EXAMPLES: 100, "steps": float("nan")})),
    "1e6 steps": lambda: _reply(9, metrics=MetricRecord({wire.Metric.EXAMPLES: 100, "steps": 1_000_000})),
    "steps past the round's steps x batch": lambda: _reply(
        9, metrics=MetricRecord({wire.Metric.EXAMPLES: 100, "steps": SETTINGS.steps * SETTINGS.batch + 1})),
    "0 steps": lambda: _reply(9, metrics=MetricRecord({wire.Metric.EXAMPLES: 100, "steps": 0})),
    "steps as a list": lambda: _reply(9, metrics=MetricRecord({wire.Metric.EXAMPLES: 100, "steps": [1.0, 2.0]})),
    "plan that is not JSON": lambda: _reply(9, client=ConfigRecord({wire.Client.NAME: "x", wire.Client.PLAN: "{"})),
    "plan of the wrong types": lambda: _reply(9, client=ConfigRecord(
        {wire.Client.NAME: "x", wire.Client.PLAN: json.dumps({"precision": ["fp32"], "targets": "q"})})),
    "name as bytes": lambda: _reply(9, client=ConfigRecord({wire.Client.NAME: b"\xff\xfe"})),
    "client record of the wrong type": lambda: _reply(9, client=MetricRecord({"name": 1.0})),
    "changes frozen LoRA A": lambda: _reply(9, arrays={A: _global()[A] + 0.01, B: _global()[B] + 0.01}),
    "NaN adapter": lambda: _reply(9, arrays={A: _global()[A], B: np.full((OUT, R), np.nan, np.float32)}),
    "scale overflow": lambda: _reply(9, arrays=_overflowing()),
    # corrupted or forged serialization: caught before numpy allocates what the .npy header claims
    "npy header claiming 10^12 floats": lambda: _reply(9, adapter=_raw_adapter(
        _npy({"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)}, b"\0" * 80))),
    "npy of pickled objects": lambda: _reply(9, adapter=_raw_adapter(
        _npy({"descr": "|O", "fortran_order": False, "shape": (1,)}, b"\x80\x04N."))),
    "npy truncated in transit": lambda: _reply(9, adapter=_raw_adapter(
        bytes(wire.to_record({B: np.zeros((OUT, R), np.float32)}, packed=False)[B].data)[:-7])),
    "npy bytes garbled in transit": lambda: _reply(9, adapter=_raw_adapter(bytes(range(256)) * 2)),
    "array of another serialization": lambda: _reply(9, adapter=_raw_adapter(b"\0" * 80, stype="torch.Tensor")),
    "adapter larger than the global": lambda: _reply(9, adapter=ArrayRecord(
        {**{f"pad{i}": Array(np.zeros(1 << 16, np.float32)) for i in range(8)}, A: Array(_global()[A])})),
}  # fmt: skip


def _npy(header: dict, body: bytes = b"") -> bytes:
    """An .npy file with a hand-written header (what Flower's Array.numpy would trust) and ``body``."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + body


def _raw_adapter(data: bytes, stype: str = "numpy.ndarray") -> ArrayRecord:
    """An adapter record whose LoRA B array carries ``data`` as its serialized bytes."""
    g = _global()
    return ArrayRecord({A: Array(g[A]), B: Array(dtype="float32", shape=(OUT, R), stype=stype, data=data)})


def _overflowing() -> dict:
    """An encoded change whose per-tensor scale is the largest float32: its decoded values overflow to inf."""
    arrays = encode({B: np.ones((OUT, R), np.float32)}, "int8").to_arrays()
    arrays["tscale"] = np.full_like(arrays["tscale"], 3.4e38)
    return arrays


def _run(hostile) -> tuple[list, ServerState]:
    state = ServerState({}, arrays=_global())
    strategy = FedgeAvg(ServerSettings(min_clients=1), stage_deadline_s=1.0)
    replies = [_reply(1), _reply(2), hostile]
    clients = strategy._check_and_average(state, replies, bytes_down=SENT, settings=SETTINGS)
    return clients, state


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_reply_is_rejected_with_a_reason_and_the_honest_ones_are_merged(name):
    clients, state = _run(HOSTILE[name]())
    liar = next(c for c in clients if c.node_id == 9)
    assert liar.accepted is False and liar.reason, liar
    assert not liar.reason.startswith("malformed reply"), liar.reason  # named by a check, not by the safety net
    assert all(c.accepted for c in clients if c.node_id != 9)
    assert all(np.isfinite(v).all() for v in state.arrays.values())
    honest_change = 0.025 * ServerSettings().server_lr  # the honest B changes (0.02, 0.03) averaged, x server lr
    assert np.allclose(state.arrays[B], honest_change, atol=1e-6)  # the liar moved nothing


def test_the_honest_pair_alone_merges_the_same():
    state = ServerState({}, arrays=_global())
    FedgeAvg(ServerSettings(min_clients=1), 1.0)._check_and_average(state, [_reply(1), _reply(2)], SENT, SETTINGS)
    assert np.allclose(state.arrays[B], 0.025 * ServerSettings().server_lr, atol=1e-6)


def test_a_device_that_shrank_its_batch_may_claim_up_to_the_rounds_examples_in_steps():
    # batch 1 for the round's 10 steps of 2: 20 steps hold the round's examples (the re-planner's cap); more is a lie
    small_batch = _reply(3, metrics=MetricRecord({wire.Metric.EXAMPLES: 100, "steps": SETTINGS.steps * SETTINGS.batch}))
    clients = FedgeAvg(ServerSettings(min_clients=1), 1.0)._check_and_average(
        ServerState({}, arrays=_global()), [_reply(1), _reply(2), small_batch], SENT, SETTINGS
    )
    assert all(c.accepted for c in clients), [c.reason for c in clients]


def test_a_sole_replier_is_bounded_and_min_clients_is_strict():
    # No peers and no history: only the absolute bound stands between a huge change and the global adapter.
    g = _global()
    huge = _reply(9, arrays={A: g[A], B: g[B] + 1e3})
    state = ServerState({}, arrays=_global())
    (entry,) = FedgeAvg(ServerSettings(min_clients=1), 1.0)._check_and_average(state, [huge], SENT, SETTINGS)
    assert entry.accepted is False and "absolute bound" in entry.reason and np.array_equal(state.arrays[B], g[B])
    # Fewer acceptable updates than --min-clients: the global stays, even when every reply was fine.
    state = ServerState({}, arrays=_global())
    FedgeAvg(ServerSettings(min_clients=3), 1.0)._check_and_average(state, [_reply(1), _reply(2)], SENT, SETTINGS)
    assert np.array_equal(state.arrays[B], g[B])


def test_a_hostile_evaluation_is_a_failure_not_an_outage():
    strategy = FedgeAvg(ServerSettings(min_clients=1), stage_deadline_s=1.0)
    bad = _reply(9, metrics=MetricRecord({wire.Metric.EXACT_MATCH: [1.0, 2.0]}))
    good = _reply(1, metrics=MetricRecord({wire.Metric.EXACT_MATCH: 0.5, wire.Metric.EVAL_EXAMPLES: 10}))
    implausible = _reply(8, metrics=MetricRecord({wire.Metric.EXACT_MATCH: 7.0, wire.Metric.EVAL_EXAMPLES: 10}))
    heavy = _reply(7, metrics=MetricRecord({wire.Metric.EXACT_MATCH: 1.0, wire.Metric.EVAL_EXAMPLES: 1e7}))
    absurd = _reply(6, metrics=MetricRecord({wire.Metric.HELDOUT_LOSS: 1e15, wire.Metric.EVAL_EXAMPLES: 10}))
    entries, failures = strategy._evaluations([good, bad, implausible, heavy, absurd], SETTINGS)
    assert [e.node_id for e in entries] == [1] and [f.node_id for f in failures] == [9, 8, 7, 6]
    assert ["exact-match" in f.reason for f in failures] == [True, True, False, False]
    assert "the round's" in failures[2].reason and "heldout-loss" in failures[3].reason


# --- fuzzing: whatever arrives, the only way out is a ValueError with a reason ---------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
HEADERS = st.fixed_dictionaries(
    {"format": st.sampled_from([1, 2, "1", None]), "codec": st.sampled_from(["int8", "int4", "topk:0.1+int8", "x"])},
    optional={"tensors": JSON | st.lists(st.tuples(st.just(B), st.lists(JSON, max_size=3), JSON).map(list)),
              "index": JSON, "bits": JSON},
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(header=HEADERS | JSON)
def test_any_codec_header_is_decoded_or_rejected_with_a_reason(header):
    try:
        arrays = _header(header)
    except (ValueError, TypeError, OverflowError):  # not JSON-encodable (NaN keys and such): nothing to send
        return
    try:
        hetero.from_reply(arrays, _global(), SETTINGS.lora_alpha)
    except ValueError as err:
        assert str(err)


@settings(max_examples=150, deadline=None)
@given(
    info=st.dictionaries(st.sampled_from(["name", "plan", "codec", "data", "device"]), JSON, max_size=5),
    metrics=st.dictionaries(st.sampled_from(["num-examples", "steps", "train-loss", "other"]), JSON, max_size=4),
)
def test_any_client_record_and_metrics_are_read_or_rejected_with_a_reason(info, metrics):
    try:
        entry = ClientRound.from_reply(9, info, metrics)
    except ValueError as err:
        assert str(err)
        return
    assert isinstance(entry.name, str) and all(isinstance(v, int | float) for v in entry.extra.values())


# --- steering: what a client claims about itself buys it at most its capped share ------------------------------


def _liar(change: float, examples: float = 1e7, steps: int = 1) -> SimpleNamespace:
    g = _global()
    metrics = MetricRecord({wire.Metric.EXAMPLES: examples, "steps": steps})
    return _reply(9, arrays={A: g[A], B: g[B] + change}, metrics=metrics)


def test_a_client_claiming_every_example_and_one_step_moves_the_global_by_at_most_its_capped_share():
    state, server = ServerState({}, arrays=_global()), ServerSettings(min_clients=1)
    honest = [_reply(n) for n in (1, 2, 3)]  # B + 0.02, 0.03, 0.04: 100 examples, 10 steps each
    clients = FedgeAvg(server, 1.0)._check_and_average(state, [*honest, _liar(0.05)], SENT, SETTINGS)
    liar = next(c for c in clients if c.node_id == 9)
    assert all(c.accepted for c in clients)
    assert liar.share == pytest.approx(server.max_share)  # uncapped it would be 0.9999
    assert sum(c.share for c in clients) == pytest.approx(1.0, abs=1e-5)
    honest_part = np.mean([0.02, 0.03, 0.04]) * (1 - server.max_share)
    assert np.allclose(state.arrays[B], server.server_lr * (honest_part + server.max_share * 0.05), atol=1e-6)


def test_examples_count_at_most_so_much_over_what_a_node_was_counted_for_before():
    state, strategy = ServerState({}, arrays=_global()), FedgeAvg(ServerSettings(min_clients=1), 1.0)
    strategy._check_and_average(state, [_reply(1), _reply(2)], SENT, SETTINGS)  # node 2 counted for 100
    grown = _reply(2, metrics=MetricRecord({wire.Metric.EXAMPLES: 1000, "steps": 10}))
    clients = strategy._check_and_average(state, [_reply(1), grown], SENT, SETTINGS)
    assert clients[1].accepted and clients[1].examples_counted == 200  # 2x, flagged; it may grow again next round
    assert any("examples_growth" in f for f in clients[1].flags) and clients[1].share == pytest.approx(0.5)  # cap
    # a client calling itself client-2 from another node neither inherits nor lowers node 2's history
    impostor = _reply(7, metrics=MetricRecord({wire.Metric.EXAMPLES: 1, "steps": 10}),
                      client=ConfigRecord({wire.Client.NAME: "client-2"}))  # fmt: skip
    strategy._check_and_average(state, [_reply(1), impostor], SENT, SETTINGS)
    clients = strategy._check_and_average(state, [_reply(1), _reply(2)], SENT, SETTINGS)
    assert clients[1].accepted and clients[1].examples_counted == 100 and not clients[1].flags


def test_metrics_cannot_fill_the_fields_the_server_owns():
    metrics = {wire.Metric.EXAMPLES: 100, "steps": 10, "name": 1.0, "accepted": 1.0, "share": 0.99, "plan": 1.0,
               "clip-scale": 0.1, "node-id": 1.0, "exact-match": 7.0, "delta-rms": 0.0}  # fmt: skip
    state = ServerState({}, arrays=_global())
    clients = FedgeAvg(ServerSettings(min_clients=1), 1.0)._check_and_average(
        state, [_reply(1), _reply(3, metrics=MetricRecord(metrics))], SENT, SETTINGS
    )
    liar = clients[1]
    assert liar.accepted, liar.reason
    assert liar.name == "client-3" and liar.node_id == 3 and liar.plan is None and liar.clip_scale is None
    assert liar.exact_match is None and liar.share == pytest.approx(0.5) and liar.delta_rms > 0
    assert set(liar.extra) >= {"name", "accepted", "share", "plan", "clip-scale", "exact-match"}
    RoundRecord.summarize(1, clients, [], [], 0.0)  # sorts and counts without tripping over anything


def test_a_reused_name_does_not_overwrite_the_honest_clients_record():
    impostor = _reply(9, arrays={A: _global()[A], B: np.full((OUT, R), np.nan, np.float32)},
                      client=ConfigRecord({wire.Client.NAME: "client-1"}))  # fmt: skip
    state = ServerState({}, arrays=_global())
    clients = FedgeAvg(ServerSettings(min_clients=1), 1.0)._check_and_average(
        state, [_reply(1), _reply(2), impostor], SENT, SETTINGS
    )
    record = RoundRecord.summarize(1, clients, [], [], 0.0)
    named = sorted((c.name, c.node_id, c.accepted) for c in record.clients)
    assert named == [("client-1", 1, True), ("client-1", 9, False), ("client-2", 2, True)]


@pytest.mark.parametrize("quiet", [[1e-9], [1e-9, 1e-9], [1e-9, 2e-9]], ids=["one", "duplicated", "two"])
def test_near_zero_replies_do_not_get_an_honest_peer_rejected(quiet):
    """Near-zero replies (one, two identical, two different) beside one honest client: round 1, no history. The
    honest change is merged; the zeros only dilute it (bounded by the share cap)."""
    g, zeros = _global(), len(quiet)
    quiet = [_reply(5 + i, arrays={A: g[A], B: g[B] + q}) for i, q in enumerate(quiet)]
    state = ServerState({}, arrays=_global())
    clients = FedgeAvg(ServerSettings(min_clients=1), 1.0)._check_and_average(
        state, [_reply(1), *quiet], SENT, SETTINGS
    )
    assert clients[0].accepted, clients[0].reason
    assert state.arrays[B].mean() > 0.01 / (zeros + 1)  # the honest change arrived


def test_implausible_reports_are_flagged_and_weigh_nothing():
    metrics = MetricRecord({wire.Metric.EXAMPLES: 100, "steps": 10, "tokens": 1e9, "energy-j": -3.0})
    state = ServerState({}, arrays=_global())
    clients = FedgeAvg(ServerSettings(min_clients=1), 1.0)._check_and_average(
        state, [_reply(1), _reply(2, metrics=metrics)], SENT, SETTINGS
    )
    assert clients[1].accepted and len(clients[1].flags) == 2, clients[1].flags
    assert any("tokens" in f for f in clients[1].flags) and any("energy_j" in f for f in clients[1].flags)
    assert not clients[0].flags


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=400), cut=st.integers(0, 200), flip=st.integers(0, 255))
def test_any_array_bytes_are_read_or_rejected_with_a_reason(data, cut, flip):
    """Random bytes, and a real array's bytes cut short or with one byte changed, as a transit error would."""
    real = bytearray(wire.to_record({B: np.ones((OUT, R), np.float32)}, packed=False)[B].data)
    real[cut % len(real)] ^= flip
    for blob in (data, bytes(real), bytes(real[:cut])):
        try:
            arrays = wire.read_record(_raw_adapter(blob), max_bytes=1 << 20)
        except ValueError as err:
            assert str(err)
        else:
            assert arrays[B].dtype.kind in "biuf"


def _encoded(delta: dict) -> dict:
    return encode(delta, "none").to_arrays()


def test_a_sole_sender_of_a_tensor_moves_it_by_at_most_its_capped_share():
    """Four honest clients train only layer 1; the fifth sends a change of layer 0 alone. Normalized over the
    tensor's senders it would own layer 0; capped, it moves it by at most max_share of its change."""
    a1, b1 = A.replace("layers.0", "layers.1"), B.replace("layers.0", "layers.1")
    rng = np.random.default_rng(1)
    g = {**_global(), a1: rng.standard_normal((R, IN)).astype(np.float32), b1: np.zeros((OUT, R), np.float32)}
    honest = [_reply(n, arrays=_encoded({b1: np.full((OUT, R), 0.01 * (n + 1), np.float32)})) for n in (1, 2, 3, 4)]
    lone = _reply(9, arrays=_encoded({B: np.full((OUT, R), 0.09, np.float32)}))
    state, server = ServerState({}, arrays=g), ServerSettings(min_clients=1)
    clients = FedgeAvg(server, 1.0)._check_and_average(state, [*honest, lone], SENT, SETTINGS)
    assert all(c.accepted for c in clients)
    assert np.abs(state.arrays[B]).max() <= server.server_lr * server.max_share * 0.09 + 1e-6


def test_a_lower_rank_reply_is_judged_at_the_size_it_lands_in_the_global():
    """Rank 1 of the global's 4: its B change is scaled by s(1) / s(4) = 4 in the merge, and judged at that size."""
    low = _reply(9, arrays=_encoded({B: np.full((OUT, 1), 0.09, np.float32)}))
    state = ServerState({}, arrays=_global())
    clients = FedgeAvg(ServerSettings(min_clients=1), 1.0)._check_and_average(
        state, [_reply(1), _reply(2), low], SENT, SETTINGS
    )
    assert clients[2].accepted is False and "norm 0.36" in clients[2].reason, clients[2].reason
    assert np.allclose(state.arrays[B], 0.025 * ServerSettings().server_lr, atol=1e-6)


def test_two_honest_clients_with_large_changes_are_both_merged_in_round_one():
    """No history, one peer each: nothing to judge a change against but the absolute bound (the norm floor is no
    reference alone). Found by the agent's day-in-the-life run: 400 local steps made 0.14-RMS changes."""
    g = _global()
    big = [_reply(n, arrays={A: g[A], B: g[B] + change}) for n, change in ((1, 0.148), (2, 0.14))]
    state = ServerState({}, arrays=_global())
    clients = FedgeAvg(ServerSettings(min_clients=1), 1.0)._check_and_average(state, big, SENT, SETTINGS)
    assert all(c.accepted for c in clients), [c.reason for c in clients]


def _planned(peak_bytes: int) -> SimpleNamespace:
    """A training reply whose client record carries a real plan that predicts ``peak_bytes`` of memory."""
    from fedge.edge_client.device.emulated import PROFILES
    from fedge.edge_client.planning.costs import ModelShape
    from fedge.edge_client.planning.plan import RoundBudget, make_plan

    shape = ModelShape(layers=2, hidden=16, intermediate=32, vocab=64, heads=2, kv_heads=2)
    plan = make_plan(PROFILES["laptop"].caps(), RoundBudget(deadline_s=60, steps=10), shape)
    plan = dataclasses.replace(plan, predicted_peak_bytes=peak_bytes)
    return _reply(9, client=ConfigRecord({wire.Client.NAME: "laptop", wire.Client.PLAN: plan.to_json()}))


def test_a_plan_for_more_than_2_gib_is_a_plan_and_one_beyond_any_device_is_not():
    """A laptop planning a 270M model with a 262k vocabulary predicts 2.1 GiB: no 32-bit bound may refuse it."""
    clients, _ = _run(_planned(3 * 2**30))
    laptop = next(c for c in clients if c.node_id == 9)
    assert laptop.accepted and laptop.plan["predicted_peak_bytes"] == 3 * 2**30
    clients, _ = _run(_planned(2**43))  # 8 TiB: no edge device
    liar = next(c for c in clients if c.node_id == 9)
    assert not liar.accepted and "predicted_peak_bytes" in liar.reason
