"""A client's work for one round, independent of how the message arrived: train or evaluate the global adapter.

Used by the ClientApp in-process, by the warm worker (:mod:`edge_client.worker`) that keeps the model loaded
between rounds, by the simulation engine and by the benchmarks, so all of them train the same way.

Local work is never lost to a restart: training checkpoints every few steps into a work directory named by
the global adapter, the round settings, the data and the round, and the finished update is saved there
before the reply goes out. The same message after a restart resumes that work or replies from it at once.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_client import wire
from edge_client.fsutil import atomic_write_bytes, atomic_write_text

UPDATE_FILE, METRICS_FILE = "update.npz", "metrics.json"
KEEP_WORK_DIRS = 3
Arrays = dict[str, np.ndarray]


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
    worker_port: int = 0  # 0: no warm worker, the ClientApp process does the work

    @classmethod
    def from_node_config(cls, config) -> Device:
        from edge_client.models import default_cache_dir

        if wire.Node.DATA not in config:
            raise ValueError(f"node config has no {wire.Node.DATA!r}: start the client with `fedge client start`")
        return cls(
            name=str(config.get(wire.Node.NAME, "client")),
            data=str(config[wire.Node.DATA]),
            eval_data=str(config[wire.Node.EVAL_DATA]) if config.get(wire.Node.EVAL_DATA) else None,
            state_dir=Path(str(config.get(wire.Node.STATE_DIR, Path.home() / ".fedge" / "client"))),
            cache_dir=Path(str(config.get(wire.Node.CACHE_DIR) or default_cache_dir())),
            precision=str(config.get(wire.Node.PRECISION, "auto")),
            threads=int(config.get(wire.Node.THREADS, 0)),
            worker_port=int(config.get(wire.Node.WORKER_PORT, 0)),
        )


@dataclass
class _Loaded:
    """The process's model: a base model (kept) and the LoRA wrapper of the current round shape."""

    base_key: tuple
    session: object
    lora_key: tuple | None = None
    model: object = None


_LOADED: list[_Loaded] = []  # at most one: a device has no memory for two models


def load_base(device: Device, model: str) -> object:
    """Load (once per process) the base model ``model`` at the device's precision; returns the session."""
    import torch

    from edge_client.session import open_model

    if device.threads > 0:
        torch.set_num_threads(device.threads)
    key = (model, device.precision, str(device.cache_dir))
    if not _LOADED or _LOADED[0].base_key != key:
        _LOADED.clear()
        _LOADED.append(_Loaded(key, open_model(model, device.cache_dir, device.precision)))
    return _LOADED[0].session


def open_adapter(device: Device, settings: wire.RoundSettings) -> tuple:
    """(session, peft model) with a LoRA adapter of the round's shape, reusing what this process loaded."""
    from edge_client.train import add_lora

    session = load_base(device, settings.model)
    loaded = _LOADED[0]
    lora_key = (settings.lora_r, settings.lora_alpha, settings.lora_targets, settings.lora_freeze_a, settings.seed)
    if loaded.lora_key != lora_key:
        if loaded.model is not None:
            session.model = loaded.model.unload()  # drop the old LoRA layers, keep the base weights
        loaded.model, loaded.lora_key = add_lora(session.model, lora_settings(settings), seed=settings.seed), lora_key
    return session, loaded.model


def lora_settings(settings: wire.RoundSettings):
    from edge_client.train import LoraSettings

    targets = tuple(t.strip() for t in settings.lora_targets.split(",") if t.strip())
    return LoraSettings(
        r=settings.lora_r, alpha=settings.lora_alpha, target_modules=targets, freeze_a=settings.lora_freeze_a
    )


def train_config(settings: wire.RoundSettings, rnd: int):
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
        lora=lora_settings(settings),
    )


def local_data(device: Device, seed: int) -> tuple[list, list]:
    """(train, held-out): ``eval-data`` if the node has it, else 10% of ``data`` held out."""
    from edge_client.data import load_examples
    from edge_client.session import split_heldout

    examples = load_examples(device.data)
    if device.eval_data:
        return examples, load_examples(device.eval_data)
    return split_heldout(examples, 0.1, seed)


def do_train(device: Device, settings: wire.RoundSettings, global_arrays: Arrays, rnd: int) -> tuple[Arrays, dict]:
    """Train the global adapter for the round's steps on local data: (new adapter, metrics)."""
    from edge_client.data import fingerprint
    from edge_client.energy import EnergySession
    from edge_client.session import epoch_maker
    from edge_client.train import train

    train_set, _ = local_data(device, settings.seed)
    data_id = fingerprint(train_set)
    work = device.state_dir / "work" / _work_key(global_arrays, settings, f"{data_id}|{rnd}")
    if (work / UPDATE_FILE).is_file():  # finished before a restart: reply with that work
        arrays, metrics = _load_update(work)
        return arrays, {**metrics, wire.Metric.RESUMED: 1}
    t0 = time.time()
    session, model = open_adapter(device, settings)
    set_adapter(model, global_arrays)
    load_seconds = time.time() - t0
    cfg = train_config(settings, rnd)
    with EnergySession(interval_s=1.0) as meter:
        result = train(
            model,
            epoch_maker(session.tokenizer, train_set, cfg),
            cfg,
            session.device,
            state_dir=work,
            run_id=f"{session.model_dir}|{data_id}",
        )
    arrays = get_adapter(model)
    metrics = {
        wire.Metric.EXAMPLES: len(train_set),
        wire.Metric.STEPS: result.steps,
        wire.Metric.TOKENS: result.tokens,
        wire.Metric.TRAIN_LOSS: result.final_loss,
        wire.Metric.TRAIN_SECONDS: result.seconds,
        wire.Metric.LOAD_SECONDS: load_seconds,
        wire.Metric.PEAK_RSS_MB: result.peak_rss_mb,
        wire.Metric.ENERGY_J: meter.result.joules,
        wire.Client.ENERGY_METHOD: meter.result.method,  # a string: the ClientApp moves it to the CLIENT record
    }
    _save_update(work, arrays, metrics)  # before replying: a lost reply costs a resend, not the training
    _prune_work(work.parent)
    return arrays, {**metrics, wire.Metric.RESUMED: 0}


def do_evaluate(device: Device, settings: wire.RoundSettings, global_arrays: Arrays) -> dict:
    """Held-out loss and exact match of the global adapter on this device's held-out examples."""
    from edge_client.evaluate import evaluate
    from edge_client.session import eval_batches

    _, heldout = local_data(device, settings.seed)
    heldout = heldout[:: max(1, len(heldout) // settings.eval_examples)][: settings.eval_examples]
    t0 = time.time()
    session, model = open_adapter(device, settings)
    set_adapter(model, global_arrays)
    load_seconds = time.time() - t0
    # An exact match cannot be longer than the longest reference, so generation stops there (plus EOS):
    # a rambling base model costs no more than a trained one.
    longest = max((len(session.tokenizer(ex.answer)["input_ids"]) for ex in heldout if ex.messages), default=16)
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
        wire.Metric.LOAD_SECONDS: load_seconds,
    }
    if result.exact_match is not None:
        metrics[wire.Metric.EXACT_MATCH] = result.exact_match
    return metrics


def initial_adapter(cache_dir: Path, settings: wire.RoundSettings) -> Arrays:
    """The federation's starting adapter: LoRA A seeded, B zero, so round 0 is the base model."""
    _, model = open_adapter(Device("server", "", None, Path("."), cache_dir, "fp32"), settings)
    return get_adapter(model)


def set_adapter(model, arrays: Arrays) -> None:
    import torch
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, {k: torch.from_numpy(v) for k, v in arrays.items()})
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"the global adapter does not fit this model: missing {missing[:3]}, "
            f"unexpected {list(result.unexpected_keys)[:3]}"
        )


def get_adapter(model) -> Arrays:
    """The adapter's tensors as float32 numpy copies (never views of the live parameters, which train on)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().cpu().numpy().copy() for k, v in get_peft_model_state_dict(model).items()}


def _work_key(global_arrays: Arrays, settings: wire.RoundSettings, data_id: str) -> str:
    blob = f"{wire.fingerprint(global_arrays)}|{json.dumps(settings.to_config(), sort_keys=True)}|{data_id}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _save_update(work: Path, arrays: Arrays, metrics: dict) -> None:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_text(work / METRICS_FILE, json.dumps(metrics))
    atomic_write_bytes(work / UPDATE_FILE, buf.getvalue())  # last: its presence means the work is complete


def _load_update(work: Path) -> tuple[Arrays, dict]:
    with np.load(work / UPDATE_FILE) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return arrays, json.loads((work / METRICS_FILE).read_text())


def _prune_work(root: Path) -> None:
    """Keep the newest few work directories: enough to resume after a restart, not a growing pile."""
    dirs = sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime, reverse=True)
    for old in dirs[KEEP_WORK_DIRS:]:
        shutil.rmtree(old, ignore_errors=True)
