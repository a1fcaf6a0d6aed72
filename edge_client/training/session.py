"""Examples into what training and evaluation consume: epochs of micro-batches, held-out batches, a held-out split.

The model itself is opened by `fedge.common.modeling` (``open_model``, ``ModelHolder``), the same way on every path.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from fedge.common.errors import FedgeError
from fedge.edge_client.training.data import Batch, Encoded, Example, encode_all, packed_batches, padded_batches
from fedge.edge_client.training.train import TrainConfig


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
