"""The Flower ClientApp: train the global adapter on this device's data, evaluate it, reply with the update.

Flower starts a fresh ClientApp process per message in deployment (SuperNode subprocess isolation), so each
round pays a fixed cost: the process start (imports) and loading the base model from the local cache
(never converted or downloaded again). Both are measured and sent back. Under the simulation engine the
process lives on, and the loaded model is reused from :data:`_SESSIONS`.

Local work is never lost to a server restart: training checkpoints every few steps into a work directory
named by the global adapter, the round settings and the data, and the finished update is saved there before
the reply goes out. The same message after a restart resumes that work or replies from it at once.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from edge_client import wire
from edge_client.fsutil import atomic_write_bytes, atomic_write_text

app = ClientApp()
_PROCESS_START = psutil.Process().create_time()
_SESSIONS: dict[tuple, tuple] = {}  # (model, precision, lora) -> (session, peft model), reused within a process
UPDATE_FILE, METRICS_FILE = "update.npz", "metrics.json"
KEEP_WORK_DIRS = 3


@dataclass
class Device:
    """This device's side of the federation, from the SuperNode's ``--node-config`` (see ``fedge client start``)."""

    name: str
    data: str
    eval_data: str | None
    state_dir: Path
    cache_dir: Path
    precision: str = "auto"
    threads: int = 0  # 0: torch's default

    @classmethod
    def from_node_config(cls, config) -> Device:
        from edge_client.models import default_cache_dir

        if wire.Node.DATA not in config:
            raise ValueError(f"node config has no {wire.Node.DATA!r}: start the client with `fedge client start`")
        state = Path(str(config.get(wire.Node.STATE_DIR, Path.home() / ".fedge-client")))
        return cls(
            name=str(config.get(wire.Node.NAME, "client")),
            data=str(config[wire.Node.DATA]),
            eval_data=str(config[wire.Node.EVAL_DATA]) if config.get(wire.Node.EVAL_DATA) else None,
            state_dir=state,
            cache_dir=Path(str(config.get(wire.Node.CACHE_DIR) or default_cache_dir())),
            precision=str(config.get(wire.Node.PRECISION, "auto")),
            threads=int(config.get(wire.Node.THREADS, 0)),
        )


@app.train()
def train_round(msg: Message, context: Context) -> Message:
    """Load the global adapter, train it for the round's steps, reply with the new adapter and the costs."""
    startup = time.time() - _PROCESS_START
    device = Device.from_node_config(context.node_config)
    settings = wire.RoundSettings.from_config(msg.content[wire.CONFIG])
    global_arrays = wire.from_record(msg.content[wire.ADAPTER])
    train_set, _ = _local_data(device, settings.seed)

    from edge_client.data import fingerprint

    data_id = fingerprint(train_set)
    rnd = int(msg.content[wire.CONFIG].get(wire.Cfg.ROUND, 0))
    work = device.state_dir / "work" / _work_key(global_arrays, settings, f"{data_id}|{rnd}")
    if (work / UPDATE_FILE).is_file():  # finished before a restart: reply with that work
        arrays, metrics = _load_update(work)
        metrics.update({wire.Metric.STARTUP_SECONDS: startup, wire.Metric.RESUMED: 1})
        return _reply(msg, device, arrays, metrics)

    t0 = time.time()
    session, model = _open(device, settings)
    _set_adapter(model, global_arrays)
    load_seconds = time.time() - t0

    from edge_client.session import epoch_maker
    from edge_client.train import train

    cfg = _train_config(settings, rnd)
    result = train(
        model,
        epoch_maker(session.tokenizer, train_set, cfg),
        cfg,
        session.device,
        state_dir=work,
        run_id=f"{session.model_dir}|{data_id}",
    )
    arrays = _get_adapter(model)
    metrics = {
        wire.Metric.EXAMPLES: len(train_set),
        wire.Metric.STEPS: result.steps,
        wire.Metric.TOKENS: result.tokens,
        wire.Metric.TRAIN_LOSS: result.final_loss,
        wire.Metric.TRAIN_SECONDS: result.seconds,
        wire.Metric.LOAD_SECONDS: load_seconds,
        wire.Metric.PEAK_RSS_MB: result.peak_rss_mb,
    }
    _save_update(work, arrays, metrics)  # before replying: a lost reply costs a resend, not the training
    _prune_work(work.parent)
    return _reply(msg, device, arrays, {**metrics, wire.Metric.STARTUP_SECONDS: startup, wire.Metric.RESUMED: 0})


@app.evaluate()
def evaluate_round(msg: Message, context: Context) -> Message:
    """Held-out loss and exact match of the global adapter on this device's held-out examples."""
    startup = time.time() - _PROCESS_START
    device = Device.from_node_config(context.node_config)
    settings = wire.RoundSettings.from_config(msg.content[wire.CONFIG])
    _, heldout = _local_data(device, settings.seed)
    heldout = heldout[:: max(1, len(heldout) // settings.eval_examples)][: settings.eval_examples]

    t0 = time.time()
    session, model = _open(device, settings)
    _set_adapter(model, wire.from_record(msg.content[wire.ADAPTER]))
    load_seconds = time.time() - t0

    from edge_client.evaluate import evaluate
    from edge_client.session import eval_batches

    # An exact match cannot be longer than the longest reference, so generation stops there (plus EOS):
    # a rambling base model costs no more than a trained one.
    longest = max((len(session.tokenizer(ex.answer)["input_ids"]) for ex in heldout if ex.answer), default=16)
    result = evaluate(
        model,
        session.tokenizer,
        eval_batches(session.tokenizer, heldout, settings.seq_len),
        heldout,
        session.device,
        max_new_tokens=longest + 2,
    )
    metrics = {
        wire.Metric.EVAL_EXAMPLES: len(heldout),
        wire.Metric.HELDOUT_LOSS: result.loss,
        wire.Metric.STARTUP_SECONDS: startup,
        wire.Metric.LOAD_SECONDS: load_seconds,
    }
    if result.exact_match is not None:
        metrics[wire.Metric.EXACT_MATCH] = result.exact_match
    content = RecordDict({wire.METRICS: MetricRecord(metrics), wire.CLIENT: _client_info(device)})
    return Message(content, reply_to=msg)


def _local_data(device: Device, seed: int) -> tuple[list, list]:
    """(train, held-out): ``eval-data`` if the node has it, else 10% of ``data`` held out."""
    from edge_client.data import load_examples
    from edge_client.session import split_heldout

    examples = load_examples(device.data)
    if device.eval_data:
        return examples, load_examples(device.eval_data)
    return split_heldout(examples, 0.1, seed)


def _train_config(settings: wire.RoundSettings, rnd: int):
    """Local training for round ``rnd``: the data order is seeded per round, so rounds see different batches."""
    from edge_client.train import TrainConfig

    return TrainConfig(
        steps=settings.steps,
        micro_batch=settings.batch,
        lr=settings.lr,
        seq_len=settings.seq_len,
        seed=settings.seed * 1000 + rnd,
        warmup_steps=min(10, settings.steps // 5),
        lr_schedule="constant",
        checkpoint_every=10,
        lora=_lora(settings),
    )


def _lora(settings: wire.RoundSettings):
    from edge_client.train import LoraSettings

    targets = tuple(t.strip() for t in settings.lora_targets.split(",") if t.strip())
    return LoraSettings(
        r=settings.lora_r, alpha=settings.lora_alpha, target_modules=targets, freeze_a=settings.lora_freeze_a
    )


def _open(device: Device, settings: wire.RoundSettings) -> tuple:
    """The base model with a LoRA adapter of the round's shape (loaded once per process)."""
    import torch

    from edge_client.session import open_model
    from edge_client.train import add_lora

    if device.threads > 0:
        torch.set_num_threads(device.threads)
    key = (
        settings.model,
        device.precision,
        settings.lora_r,
        settings.lora_alpha,
        settings.lora_targets,
        settings.lora_freeze_a,
    )
    if key not in _SESSIONS:
        _SESSIONS.clear()  # one model per process: a device has no memory for two
        session = open_model(settings.model, device.cache_dir, device.precision)
        _SESSIONS[key] = (session, add_lora(session.model, _lora(settings), seed=settings.seed))
    return _SESSIONS[key]


def initial_adapter(model_source: str, cache_dir: Path, settings: wire.RoundSettings) -> dict[str, np.ndarray]:
    """The federation's starting adapter: LoRA A seeded, B zero, so round 0 is the base model."""
    session, model = _open(Device("server", "", None, Path("."), cache_dir, "fp32"), settings)
    return _get_adapter(model)


def _set_adapter(model, arrays: dict[str, np.ndarray]) -> None:
    import torch
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, {k: torch.from_numpy(v) for k, v in arrays.items()})
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"the global adapter does not fit this model: missing {missing[:3]}, "
            f"unexpected {list(result.unexpected_keys)[:3]}"
        )


def _get_adapter(model) -> dict[str, np.ndarray]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().cpu().numpy() for k, v in get_peft_model_state_dict(model).items()}


def _work_key(global_arrays: dict[str, np.ndarray], settings: wire.RoundSettings, data_id: str) -> str:
    import hashlib

    blob = f"{wire.fingerprint(global_arrays)}|{json.dumps(settings.to_config(), sort_keys=True)}|{data_id}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _save_update(work: Path, arrays: dict[str, np.ndarray], metrics: dict) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_text(work / METRICS_FILE, json.dumps(metrics))
    atomic_write_bytes(work / UPDATE_FILE, buf.getvalue())  # last: its presence means the work is complete


def _load_update(work: Path) -> tuple[dict[str, np.ndarray], dict]:
    with np.load(work / UPDATE_FILE) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return arrays, json.loads((work / METRICS_FILE).read_text())


def _prune_work(root: Path) -> None:
    """Keep the newest few work directories: enough to resume after a restart, not a growing pile."""
    dirs = sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime, reverse=True)
    for old in dirs[KEEP_WORK_DIRS:]:
        shutil.rmtree(old, ignore_errors=True)


def _client_info(device: Device) -> ConfigRecord:
    import platform

    return ConfigRecord(
        {
            wire.Client.NAME: device.name,
            wire.Client.DATA: device.data,
            wire.Client.DEVICE: f"{platform.machine()} {psutil.cpu_count()} cpus",
        }
    )


def _reply(msg: Message, device: Device, arrays: dict[str, np.ndarray], metrics: dict) -> Message:
    content = RecordDict(
        {wire.ADAPTER: wire.to_record(arrays), wire.METRICS: MetricRecord(metrics), wire.CLIENT: _client_info(device)}
    )
    return Message(content, reply_to=msg)
