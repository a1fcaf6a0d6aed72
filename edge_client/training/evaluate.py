"""Evaluation: held-out loss / perplexity and exact match of batched greedy generations."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedge.edge_client.training.data import Batch, Example, encode, prompt_text
from fedge.edge_client.training.train import body_and_head, lean_loss


@dataclass
class EvalResult:
    loss: float | None = None
    perplexity: float | None = None
    exact_match: float | None = None
    n_loss: int = 0  # labelled tokens behind ``loss``
    n_generated: int = 0  # examples behind ``exact_match``
    n_decoded: int = 0  # of those, decided by generating token by token (the rest by one teacher-forced pass)
    hits: list[bool] | None = None  # per chat example of ``gen_examples``, in order: its greedy reply matched

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


@dataclass
class MatchCheck:
    """What `teacher_forced_matches` decided: a verdict per example (None: generation must decide), and the
    held-out loss of the references (reply and end token) the same pass measured."""

    verdicts: list[bool | None]
    loss_sum: float = 0.0
    n_loss: int = 0

    @property
    def undecided(self) -> list[int]:
        return [i for i, v in enumerate(self.verdicts) if v is None]


@torch.no_grad()
def teacher_forced_matches(
    model: torch.nn.Module,
    tokenizer,
    examples: Sequence[Example],
    device: torch.device,
    max_new_tokens: int,
    batch_size: int = 16,
) -> MatchCheck:
    """Whether greedy decoding would reproduce each reference reply, from one forward pass over prompt + reference.

    Greedy decoding writes the reference and stops iff at every reference position (and the end token after it)
    the argmax is that token: then it is a match. Where the argmax first differs, greedy has written the reference's
    first k tokens and another one; if that text, normalized, is no prefix of the normalized reference, no later
    token can make it one (byte-level pieces only append text): not a match. Anything else (a different split of
    the same text, a reply longer than ``max_new_tokens``, a partial character, a near tie on the way: `tie_margin`)
    is left to generation (None).

    The same pass scores every reference (reply and end token, as training's rows label them): the held-out loss
    of these examples, with no pass of its own.
    """
    model.eval()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    check = MatchCheck([None] * len(examples))
    rows = []
    for i, ex in enumerate(examples):
        prompt = tokenizer(prompt_text(tokenizer, ex.prompt), add_special_tokens=False)["input_ids"]
        reply = tokenizer(ex.answer, add_special_tokens=False)["input_ids"]
        decidable = (
            eos is not None
            and len(reply) + 1 <= max_new_tokens
            and normalize_answer(tokenizer.decode(reply)) == normalize_answer(ex.answer)
        )  # else generation decides
        rows.append((i, prompt, reply, decidable))
    rows.sort(key=lambda r: len(r[1]) + len(r[2]))
    body, head = body_and_head(model)
    tie = tie_margin(body, head)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(p) + len(r) for _, p, r, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (_, prompt, reply, _) in enumerate(chunk):
            seq = prompt + reply
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        # the LM head only where a reply token is predicted: full-vocabulary logits at every position would cost
        # more than the generation this replaces
        hidden = body(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
        for row, (i, prompt, reply, decidable) in enumerate(chunk):
            targets = reply + ([eos] if eos is not None else [])
            logits = head(hidden[row, len(prompt) - 1 : len(prompt) - 1 + len(targets)]).float()
            wanted = torch.tensor(targets, device=logits.device)
            check.loss_sum += F.cross_entropy(logits, wanted, reduction="sum").item()
            check.n_loss += len(targets)
            if not decidable:
                continue
            top = logits.topk(2, dim=-1) if logits.shape[-1] > 1 else None
            picks = logits.argmax(-1).tolist()
            k = next((t for t, (a, b) in enumerate(zip(picks, targets)) if a != b), None)
            if top is not None and bool((top.values[: len(targets) if k is None else k + 1].diff(dim=-1) > -tie).any()):
                continue  # a near tie on the way: generation's own arithmetic may break it the other way
            if k is None:
                check.verdicts[i] = True
                continue
            text = normalize_answer(tokenizer.decode(reply[:k] + [picks[k]], skip_special_tokens=True))
            reference = normalize_answer(examples[i].answer)
            if "\ufffd" not in text and not reference.startswith(text) and not (k == len(reply) and text == reference):
                check.verdicts[i] = False
    return check


def tie_margin(*modules: torch.nn.Module) -> float:
    """Logit gap below which the teacher-forced pass does not decide for greedy decoding: generation computes the
    same logits another way (one token at a time against a KV cache), equal in exact arithmetic but not with bf16
    or quantized weights, where the demo's adapter showed a tie in one pass and a lead of a quarter in the other."""
    exact = all(p.dtype == torch.float32 for m in modules for p in m.parameters())
    return 1e-4 if exact else 0.25


def exact_match(predictions: Sequence[str], examples: Sequence[Example]) -> float:
    """Fraction of predictions equal to the reference reply after :func:`normalize_answer`."""
    if not examples:
        return float("nan")
    hits = sum(normalize_answer(p) == normalize_answer(ex.answer) for p, ex in zip(predictions, examples))
    return hits / len(examples)


def evaluate(
    model: torch.nn.Module,
    tokenizer,
    loss_batches: Sequence[Batch] | None,
    gen_examples: Sequence[Example],
    device: torch.device,
    max_new_tokens: int | None = None,
    seq_len: int | None = None,
) -> EvalResult:
    """Held-out loss on ``loss_batches`` and exact match on the chat examples in ``gen_examples``.

    ``loss_batches`` None: the held-out loss of ``gen_examples`` themselves (rows of at most ``seq_len`` tokens, as
    `fedge.edge_client.training.session.eval_batches` makes them), taken from the pass that decides exact match when
    every example is a chat whose row fits, else from a pass of its own. ``max_new_tokens``: the generation limit for
    exact match (None: `answer_token_limit` of the references).
    """
    result = EvalResult()
    chats = [ex for ex in gen_examples if ex.text is None]
    shared = loss_batches is None and bool(chats) and len(chats) == len(gen_examples)
    if shared and seq_len is not None:
        shared = all(len(enc.input_ids) < seq_len for ex in chats for enc in encode(tokenizer, ex, seq_len))
    if loss_batches is None and not shared:
        from fedge.edge_client.training.session import eval_batches

        loss_batches = eval_batches(tokenizer, gen_examples, seq_len or 256)
    if loss_batches:
        result.loss, result.n_loss = heldout_loss(model, loss_batches, device)
        result.perplexity = math.exp(min(result.loss, 50.0))
    if chats:
        limit = max_new_tokens or answer_token_limit(tokenizer, chats)
        check = teacher_forced_matches(model, tokenizer, chats, device, limit)
        if shared and check.n_loss:
            result.loss, result.n_loss = check.loss_sum / check.n_loss, check.n_loss
            result.perplexity = math.exp(min(result.loss, 50.0))
        rest = [chats[i] for i in check.undecided]
        replies = iter(generate_answers(model, tokenizer, rest, device, max_new_tokens=limit) if rest else [])
        hits = [v if v is not None else normalize_answer(next(replies)) == normalize_answer(ex.answer)
                for v, ex in zip(check.verdicts, chats)]  # fmt: skip
        result.exact_match, result.hits = sum(hits) / len(chats), hits
        result.n_generated, result.n_decoded = len(chats), len(rest)
    return result
