"""Training data: read JSONL / TXT / CSV into chat examples, tokenize with the chat template, batch.

Accepted forms (one example per JSONL line):
- chat:        {"messages": [{"role": "user", "content": ...}, ..., {"role": "assistant", "content": ...}]}
- instruction: {"instruction": ..., "input": ... (optional), "output": ...}
- plain text:  {"text": ...}
A ``.txt`` file is plain text split on blank lines; a ``.csv`` file has a header naming one of the
forms' fields (instruction/input/output, prompt/response, or text). ``demo:DOMAIN[:SPLIT]`` reads the
built-in demo data. Loss is taken on the assistant's last reply only (on every token for plain text).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedge.common.errors import DataError

if TYPE_CHECKING:  # torch loads where batches are made: reading and checking data stays light (the agent)
    import torch

IGNORE = -100  # label value that cross-entropy skips
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Example:
    """One training example: a chat whose last message is the target reply, or plain text."""

    messages: tuple[tuple[str, str], ...] = ()  # (role, content) pairs; last is the assistant's reply
    text: str | None = None

    @property
    def prompt(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages[:-1]]

    @property
    def answer(self) -> str:
        return self.messages[-1][1]


def load_examples(source: str | Path) -> list[Example]:
    """Read every example from a file (or ``demo:DOMAIN[:SPLIT]``); raise DataError naming file and line."""
    source = str(source)
    if source.startswith("demo:"):
        return _demo_examples(source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
    raw = path.read_bytes()
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        examples = [_from_record(path, n, rec) for n, rec in _jsonl_records(path, raw)]
    elif suffix == ".csv":
        examples = _csv_examples(path, _decode(path, raw))
    elif suffix in (".txt", ".md"):
        paragraphs = [p.strip() for p in _decode(path, raw).split("\n\n")]
        examples = [Example(text=p) for p in paragraphs if p]
    else:
        raise DataError(f"{path}: unsupported file type '{suffix}'; expected .jsonl, .csv or .txt")
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples


def fingerprint(examples: Sequence[Example]) -> str:
    """sha256 of the examples' content: identifies the data an adapter was trained on."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.messages, ex.text]).encode())
    return digest.hexdigest()


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); re-save the file as UTF-8"
        ) from None


def _jsonl_records(path: Path, raw: bytes) -> Iterator[tuple[int, object]]:
    for n, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8-sig" if n == 1 else "utf-8").strip()
        except UnicodeDecodeError as err:
            raise DataError(f"{path}:{n}: not UTF-8 text (byte 0x{line[err.start]:02x}); re-save as UTF-8") from None
        if not text:
            continue
        try:
            yield n, json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{n}: not valid JSON ({err.msg} at column {err.colno})") from None


def _from_record(path: Path, line: int, rec: object) -> Example:
    where = f"{path}:{line}"
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "messages" in rec:
        return _chat_example(where, rec["messages"])
    if "instruction" in rec or "output" in rec:
        return _instruction_example(where, rec.get("instruction"), rec.get("input", ""), rec.get("output"))
    if "prompt" in rec or "response" in rec:
        return _instruction_example(where, rec.get("prompt"), "", rec.get("response"))
    if "text" in rec:
        if not isinstance(rec["text"], str) or not rec["text"].strip():
            raise DataError(f"{where}: field 'text' must be a non-empty string")
        return Example(text=rec["text"])
    raise DataError(
        f"{where}: expected one of the fields 'messages', 'instruction'+'output', 'prompt'+'response' or 'text'; "
        f"got {sorted(rec)}"
    )


def _chat_example(where: str, messages: object) -> Example:
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataError(f"{where}: field 'messages' must be a list of at least 2 messages")
    pairs = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES or not isinstance(msg.get("content"), str):
            raise DataError(f"{where}: messages[{i}] must be {{'role': one of {ROLES}, 'content': string}}")
        pairs.append((msg["role"], msg["content"]))
    if pairs[-1][0] != "assistant" or not pairs[-1][1].strip():
        raise DataError(f"{where}: the last message must be a non-empty 'assistant' reply (the training target)")
    return Example(messages=tuple(pairs))


def _instruction_example(where: str, instruction: object, inp: object, output: object) -> Example:
    for field, value in (("instruction", instruction), ("output", output)):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: field '{field}' must be a non-empty string")
    if not isinstance(inp, str):
        raise DataError(f"{where}: field 'input' must be a string")
    if not inp.strip():
        return Example(messages=(("user", str(instruction)), ("assistant", str(output))))
    # The instruction states the task, so it goes where chat models expect one: the system turn. This also
    # replaces a chat template's default system prompt (about 20 tokens for SmolLM2) on every example.
    return Example(messages=(("system", str(instruction)), ("user", inp), ("assistant", str(output))))


def _csv_examples(path: Path, text: str) -> list[Example]:
    reader = csv.DictReader(io.StringIO(text))
    fields = set(reader.fieldnames or [])
    if not fields & {"instruction", "prompt", "text"}:
        raise DataError(
            f"{path}:1: expected a header with columns instruction,output (and optional input), "
            f"prompt,response, or text; got {sorted(fields)}"
        )
    examples = []
    for n, row in enumerate(reader, start=2):
        if None in row:
            raise DataError(f"{path}:{n}: more values than header columns")
        examples.append(_from_record(path, n, {k: v for k, v in row.items() if v is not None}))
    return examples


def _demo_examples(source: str) -> list[Example]:
    from fedge.edge_client.training import demo_data

    parts = source.split(":")
    domains = demo_data.DOMAINS if parts[1] in ("all", "") else (parts[1],)
    split = parts[2] if len(parts) > 2 else "train"
    examples = []
    for domain in domains:
        try:
            records = demo_data.generate(domain, split)
        except ValueError as err:
            raise DataError(f"{source}: {err}") from None
        examples += [_from_record(Path(source), i + 1, rec) for i, rec in enumerate(records)]
    return examples


# ---------------------------------------------------------------- tokenization


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example and its labels (IGNORE outside the trained reply)."""

    input_ids: list[int]
    labels: list[int]


def prompt_text(tokenizer, prompt: list[dict[str, str]]) -> str:
    """The text a model sees before it writes its reply: the chat template, or a plain fallback."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return "".join(f"### {m['role'].title()}:\n{m['content']}\n\n" for m in prompt) + "### Assistant:\n"


def encode(tokenizer, example: Example, max_len: int) -> list[Encoded]:
    """Tokenize one example; plain text longer than ``max_len`` becomes several chunks.

    A chat example is truncated from the left of its prompt so that the reply is kept whole.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if example.text is not None:
        ids = tokenizer(example.text, add_special_tokens=False)["input_ids"] + eos
        return [Encoded(ids[i : i + max_len], ids[i : i + max_len]) for i in range(0, len(ids), max_len)]
    prompt = tokenizer(prompt_text(tokenizer, example.prompt), add_special_tokens=False)["input_ids"]
    answer = tokenizer(example.answer, add_special_tokens=False)["input_ids"] + eos
    answer = answer[:max_len]
    prompt = prompt[max(0, len(prompt) + len(answer) - max_len) :]
    return [Encoded(prompt + answer, [IGNORE] * len(prompt) + answer)]


def encode_all(tokenizer, examples: Sequence[Example], max_len: int) -> list[Encoded]:
    return [enc for ex in examples for enc in encode(tokenizer, ex, max_len)]


# ---------------------------------------------------------------- batching


@dataclass
class Batch:
    """A training batch. ``attention_mask`` is None for packed rows (``position_ids`` restart per example)."""

    input_ids: torch.Tensor  # (batch, seq)
    labels: torch.Tensor  # (batch, seq)
    tokens: int  # real (non-padding) tokens
    position_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(
            move(self.input_ids),
            move(self.labels),
            self.tokens,
            move(self.position_ids),
            move(self.attention_mask),
        )


def padded_batches(encoded: Sequence[Encoded], batch_size: int, pad_id: int, seed: int) -> list[Batch]:
    """Length-bucketed batches: examples of similar length share a batch, so little padding is computed.

    Batches are built from sorted lengths, then shuffled with ``seed``; right-padded.
    """
    import torch

    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    random.Random(seed).shuffle(groups)
    batches = []
    for group in groups:
        width = max(len(encoded[i].input_ids) for i in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        labels = torch.full((len(group), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, i in enumerate(group):
            n = len(encoded[i].input_ids)
            ids[row, :n] = torch.tensor(encoded[i].input_ids)
            labels[row, :n] = torch.tensor(encoded[i].labels)
            mask[row, :n] = 1
        batches.append(Batch(ids, labels, int(mask.sum()), attention_mask=mask))
    return batches


def packed_batches(encoded: Sequence[Encoded], batch_size: int, seq_len: int, pad_id: int, seed: int) -> list[Batch]:
    """Pack shuffled examples into rows of exactly ``seq_len`` tokens, no padding inside a row.

    Each example keeps its own positions (0, 1, ...), which transformers turns into a block-diagonal
    attention mask, so packed examples do not attend to each other. The tail of a row that no example
    fits is filled with padding as a separate "example" whose labels are ignored.
    """
    import torch

    order = list(range(len(encoded)))
    random.Random(seed).shuffle(order)
    rows: list[tuple[list[int], list[int], list[int], int]] = []
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for i in order:
        enc = encoded[i]
        if len(ids) + len(enc.input_ids) > seq_len:
            rows.append(_close_row(ids, labels, pos, seq_len, pad_id))
            ids, labels, pos = [], [], []
        ids += enc.input_ids
        labels += enc.labels
        pos += list(range(len(enc.input_ids)))
    if ids:
        rows.append(_close_row(ids, labels, pos, seq_len, pad_id))
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batches.append(
            Batch(
                input_ids=torch.tensor([r[0] for r in chunk]),
                labels=torch.tensor([r[1] for r in chunk]),
                tokens=sum(r[3] for r in chunk),
                position_ids=torch.tensor([r[2] for r in chunk]),
            )
        )
    return batches


def _close_row(ids: list[int], labels: list[int], pos: list[int], seq_len: int, pad_id: int):
    pad = seq_len - len(ids)
    return ids + [pad_id] * pad, labels + [IGNORE] * pad, pos + list(range(pad)), len(ids)
