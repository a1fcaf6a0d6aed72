"""Per-round telemetry end to end: a client's training reply carries its energy and method, the server's round
record keeps them per client, and the report plots them."""

from __future__ import annotations

import json
from types import SimpleNamespace

from fedge.common import wire


def test_a_training_reply_carries_energy_and_the_round_record_keeps_it(tiny_model_dir, tmp_path, monkeypatch):
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedge.common.modeling import ModelHolder
    from fedge.edge_client.federation import clientapp
    from fedge.edge_client.federation.settings import Device
    from fedge.server.strategy import client_round

    settings = wire.RoundSettings(
        model=str(tiny_model_dir), steps=2, batch=2, seq_len=32, lora_r=4, lora_alpha=8, lora_targets="q_proj,v_proj"
    )
    node = Device("pi-kitchen", "demo:finance", None, tmp_path / "s", tmp_path / "cache", "fp32").to_node_config()
    arrays = ModelHolder(tmp_path / "cache", "fp32").initial_adapter(settings.model, settings.lora(), settings.seed)
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # what a SuperNode's process sets
        monkeypatch.setattr(TaskIdentity, name, value)
    msg = Message(
        RecordDict({wire.ADAPTER: wire.to_record(arrays), wire.CONFIG: ConfigRecord(settings.to_config())}),
        dst_node_id=7,
        message_type="train",
    )
    reply = clientapp.train_round(msg, Context(1, 7, node, RecordDict(), {}))

    metrics, client = reply.content[wire.METRICS], reply.content[wire.CLIENT]
    assert metrics[wire.Metric.ENERGY_J] > 0 and metrics[wire.Metric.TOKENS] > 0
    assert isinstance(client[wire.Client.ENERGY_METHOD], str) and client[wire.Client.ENERGY_METHOD]
    assert wire.Client.ENERGY_METHOD not in metrics  # MetricRecord holds numbers only

    entry = client_round(SimpleNamespace(content=reply.content, metadata=SimpleNamespace(src_node_id=7)))
    assert entry.name == "pi-kitchen" and entry.energy_j == metrics[wire.Metric.ENERGY_J]
    assert entry.energy_method == client[wire.Client.ENERGY_METHOD]
    assert entry.train_seconds > 0 and entry.peak_rss_mb > 0 and entry.tokens > 0


def test_the_report_plots_energy_per_client_per_round(tmp_path):
    from fedge.server.report import write_report

    def rnd(n: int) -> dict:
        clients = [
            {"name": name, "energy_j": 10.0 * n + i, "energy_method": "estimated", "train_seconds": 2.0}
            for i, name in enumerate(("pi", "laptop"))
        ]
        return {"round": n, "exact_match": 0.1, "heldout_loss": 2.0, "train_loss": 2.1, "bytes_up": 1, "bytes_down": 1,
                "seconds": 3, "clients_replied": 2, "clients_accepted": 2, "clients": clients}  # fmt: skip

    from fedge.server.records import RoundRecord

    write_report(tmp_path, [RoundRecord.from_dict(rnd(1)), RoundRecord.from_dict(rnd(2))], {"model": "tiny"})
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["rounds"][1]["clients"][0]["energy_j"] == 20.0
    assert (tmp_path / "clients.png").read_bytes()[:4] == b"\x89PNG"
