"""Evaluation: held-out loss / perplexity and exact match of batched greedy generations."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedge.edge_client.data import Batch, Example, prompt_text
from fedge.edge_client.train import lean_loss


@dataclass
class EvalResult:
    loss: float | None = None
    perplexity: float | None = None
    exact_match: float | None = None
    n_loss: int = 0  # labelled tokens behind ``loss``
    n_generated: int = 0  # examples behind ``exact_match``

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, batches: Sequence[Batch], device: torch.device) -> tuple[float, int]:
    """Mean next-token loss over every labelled token of ``batches`` and the count of those tokens."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        loss_sum, n = lean_loss(model, batch.to(device), chunk=1024)
        total += loss_sum.item()
        count += n
    return (total / count if count else float("nan")), count


def normalize_answer(text: str) -> str:
    """Exact match compares answers with surrounding whitespace removed and inner runs collapsed."""
    return " ".join(text.split())


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    device: torch.device,
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    """Greedy replies to each example's prompt, at most ``max_new_tokens`` each, in batches (left-padded so
    generation is aligned)."""
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Sort by prompt length so each batch pads little; restore the order at the end.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt[-1]["content"]))
    answers: list[str] = [""] * len(examples)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        texts = [prompt_text(tokenizer, examples[i].prompt) for i in idx]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )  # (batch, prompt + new)
        for i, row in zip(idx, out[:, enc["input_ids"].shape[1] :]):
            answers[i] = tokenizer.decode(row, skip_special_tokens=True)
    return answers


# Tokens past the longest reference that greedy decoding may still need: its end token, and two for a model that
# splits the same text into more tokens than the reference's own tokenization.
ANSWER_SLACK_TOKENS = 3


def answer_token_limit(tokenizer, examples: Sequence[Example]) -> int:
    """New tokens exact match needs: the longest reference reply of the chat ``examples`` in tokens, plus slack.

    An exact match cannot be longer than its reference, so generation can stop there, and a rambling model costs
    no more than a trained one; a fixed cap instead scores every longer answer as a miss, however well learned.
    """
    replies = [ex.answer for ex in examples if ex.messages]
    longest = max((len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies), default=0)
    return longest + ANSWER_SLACK_TOKENS


def exact_match(predictions: Sequence[str], examples: Sequence[Example]) -> float:
    """Fraction of predictions equal to the reference reply after :func:`normalize_answer`."""
    if not examples:
        return float("nan")
    hits = sum(normalize_answer(p) == normalize_answer(ex.answer) for p, ex in zip(predictions, examples))
    return hits / len(examples)


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    loss_batches: Sequence[Batch],
    gen_examples: Sequence[Example],
    device: torch.device,
    max_new_tokens: int | None = None,
) -> EvalResult:
    """Held-out loss on ``loss_batches`` and exact match on the chat examples in ``gen_examples``.

    ``max_new_tokens``: the generation limit for exact match (None: `answer_token_limit` of the references).
    """
    result = EvalResult()
    if loss_batches:
        result.loss, result.n_loss = heldout_loss(model, loss_batches, device)
        result.perplexity = math.exp(min(result.loss, 50.0))
    chats = [ex for ex in gen_examples if ex.text is None]
    if chats:
        limit = max_new_tokens or answer_token_limit(tokenizer, chats)
        predictions = generate_answers(model, tokenizer, chats, device, max_new_tokens=limit)
        result.exact_match = exact_match(predictions, chats)
        result.n_generated = len(chats)
    return result
