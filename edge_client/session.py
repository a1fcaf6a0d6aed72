"""The library's front door: open a model for training, turn examples into epochs, train, evaluate, save.

The CLI, the Flower client and the benchmarks all go through these functions, so a model is loaded,
quantized and wrapped with LoRA the same way everywhere.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from edge_client.data import Batch, Encoded, Example, encode_all, packed_batches, padded_batches
from edge_client.errors import FedgeError, ModelError
from edge_client.models import model_info, pull_model
from edge_client.train import TrainConfig


@dataclass
class ModelSession:
    """A loaded base model (possibly quantized), its tokenizer, and where they came from."""

    model: torch.nn.Module
    tokenizer: object
    model_dir: Path
    source: str
    precision: str
    device: torch.device

    def describe(self) -> dict:
        return {
            **model_info(self.model_dir),
            "source": self.source,
            "precision": self.precision,
            "device": str(self.device),
        }


def open_model(
    source: str,
    cache_dir: Path,
    precision: str = "auto",
    device: str = "auto",
    say: Callable[[str], None] = lambda _: None,
    compute_dtype: torch.dtype | None = None,
) -> ModelSession:
    """Pull (once) and load a base model with frozen, possibly quantized weights, and its tokenizer."""
    from transformers import AutoTokenizer

    from quantization.backends import BackendUnavailable, load_base_model, pick_device

    model_dir = pull_model(source, cache_dir, say)
    try:
        dev = pick_device(device)
    except ValueError as err:
        raise FedgeError(f"--device {device}: {err}") from None
    say(f"loading {source} ({precision}) on {dev}")
    try:
        loaded = load_base_model(model_dir, precision, dev, compute_dtype=compute_dtype)
    except BackendUnavailable as err:
        raise FedgeError(str(err)) from None
    except (OSError, ValueError) as err:
        raise ModelError(f"{model_dir}: cannot load the model ({err})") from None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return ModelSession(loaded.model, tokenizer, model_dir, source, loaded.precision, dev)


def epoch_maker(tokenizer, examples: Sequence[Example], cfg: TrainConfig) -> Callable[[int], list[Batch]]:
    """A function epoch -> micro-batches: tokenized once, re-shuffled per epoch with ``cfg.seed + epoch``."""
    encoded: list[Encoded] = encode_all(tokenizer, examples, cfg.seq_len)
    if not encoded:
        raise FedgeError("no training examples after tokenization")
    pad = tokenizer.pad_token_id

    def make(epoch: int) -> list[Batch]:
        if cfg.pack:
            return packed_batches(encoded, cfg.micro_batch, cfg.seq_len, pad, cfg.seed + epoch)
        return padded_batches(encoded, cfg.micro_batch, pad, cfg.seed + epoch)

    return make


def eval_batches(tokenizer, examples: Sequence[Example], seq_len: int, batch_size: int = 16) -> list[Batch]:
    """Deterministic padded batches for held-out loss."""
    return padded_batches(encode_all(tokenizer, examples, seq_len), batch_size, tokenizer.pad_token_id, seed=0)


def split_heldout(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, heldout): a seeded random ``fraction`` held out, at least one example, never all."""
    if len(examples) < 2:
        raise FedgeError("need at least 2 examples to hold some out for evaluation (or pass --eval-data)")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    held = set(order[:n])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]
