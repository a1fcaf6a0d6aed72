"""Data loading, validation messages, tokenization with the chat template, bucketing and packing."""

from __future__ import annotations

import json
import random

import pytest
import torch

from fedge.common.errors import DataError
from fedge.edge_client.training.data import (
    IGNORE,
    Example,
    encode,
    fingerprint,
    load_examples,
    packed_batches,
    padded_batches,
)


def write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_reads_chat_instruction_and_text_forms(tmp_path):
    lines = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"instruction": "Add", "input": "2 and 3", "output": "5"},
        {"instruction": "Say yes", "output": "yes"},
        {"text": "plain text example"},
    ]
    path = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in lines) + "\n\n")
    ex = load_examples(path)
    assert ex[0].prompt == [{"role": "user", "content": "hi"}] and ex[0].answer == "hello"
    # instruction + input: the instruction becomes the system turn (replacing a template's default one)
    assert ex[1].prompt == [{"role": "system", "content": "Add"}, {"role": "user", "content": "2 and 3"}]
    assert ex[1].answer == "5"
    assert ex[2].prompt[0]["content"] == "Say yes"
    assert ex[3].text == "plain text example"


def test_reads_txt_paragraphs_and_csv(tmp_path):
    assert [e.text for e in load_examples(write(tmp_path / "a.txt", "one\nline\n\n\ntwo\n"))] == [
        "one\nline",
        "two",
    ]
    csv_path = write(tmp_path / "a.csv", 'instruction,input,output\nTranslate,"a, b",c\nAsk,,d\n')
    ex = load_examples(csv_path)
    assert [e.answer for e in ex] == ["c", "d"] and [m["content"] for m in ex[0].prompt] == ["Translate", "a, b"]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("bad.jsonl", '{"text": "ok"}\n{"text": "broken"\n', r"bad\.jsonl:2: not valid JSON"),
        ("empty.jsonl", "\n\n", r"empty\.jsonl: no examples"),
        (
            "fields.jsonl",
            '{"text": "ok"}\n{"question": "q", "answer": "a"}\n',
            r"fields\.jsonl:2: expected one of",
        ),
        (
            "out.jsonl",
            '{"instruction": "q", "output": ""}\n',
            r"out\.jsonl:1: field 'output' must be a non-empty",
        ),
        (
            "role.jsonl",
            '{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}]}\n',
            r"role\.jsonl:1: the last message must be a non-empty 'assistant'",
        ),
        ("list.jsonl", "[1, 2]\n", r"list\.jsonl:1: expected a JSON object, got list"),
        (
            "bytes.jsonl",
            b'{"text": "ok"}\n{"text": "caf\xe9"}\n',
            r"bytes\.jsonl:2: not UTF-8 text \(byte 0xe9\)",
        ),
        ("bytes.txt", b"fine\n\nbad \xff here", r"bytes\.txt:3: not UTF-8"),
        ("cols.csv", "question,answer\nq,a\n", r"cols\.csv:1: expected a header"),
        ("data.parquet", "x", r"unsupported file type '\.parquet'"),
    ],
)
def test_bad_files_name_file_line_and_expectation(tmp_path, name, content, expected):
    with pytest.raises(DataError, match=expected):
        load_examples(write(tmp_path / name, content))


def test_missing_file_and_bad_demo_domain(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="demo:nowhere"):
        load_examples("demo:nowhere")


def test_demo_source_reads_builtin_domains():
    train = load_examples("demo:finance")
    test = load_examples("demo:finance:test")
    assert len(train) > len(test) > 0
    assert len(load_examples("demo:all:test")) > len(test)
    assert fingerprint(train) != fingerprint(test)


def test_encode_labels_only_the_reply(tiny_session):
    tok = tiny_session.tokenizer
    ex = Example(messages=(("user", "Triage the patient"), ("assistant", "T2-URGENT")))
    (enc,) = encode(tok, ex, max_len=256)
    n_reply = sum(label != IGNORE for label in enc.labels)
    reply_ids = tok("T2-URGENT", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert enc.input_ids[-n_reply:] == reply_ids == enc.labels[-n_reply:]
    assert tok.decode(enc.input_ids[:-n_reply]).endswith("<|im_start|>assistant\n")


def test_encode_truncates_prompt_from_the_left_and_chunks_text(tiny_session):
    tok = tiny_session.tokenizer
    long = Example(messages=(("user", "word " * 200), ("assistant", "T1-RESUS")))
    (enc,) = encode(tok, long, max_len=32)
    assert len(enc.input_ids) == 32 and enc.labels[-1] == tok.eos_token_id
    chunks = encode(tok, Example(text="patient " * 100), max_len=16)
    assert len(chunks) > 1 and all(len(c.input_ids) <= 16 for c in chunks)


def test_padded_batches_bucket_by_length(tiny_session):
    tok = tiny_session.tokenizer
    examples = [Example(messages=(("user", "x " * n), ("assistant", "y"))) for n in range(1, 33)]
    encoded = [e for ex in examples for e in encode(tok, ex, 256)]
    batches = padded_batches(encoded, batch_size=8, pad_id=tok.pad_token_id, seed=0)
    assert sum(b.input_ids.shape[0] for b in batches) == 32
    padding = sum(int((b.attention_mask == 0).sum()) for b in batches)
    lengths = [len(e.input_ids) for e in encoded]
    random.Random(0).shuffle(lengths)
    unsorted = sum(max(g) * len(g) - sum(g) for g in (lengths[i : i + 8] for i in range(0, 32, 8)))
    assert padding < unsorted / 2  # sorted buckets pad far less than arbitrary batches
    assert [b.tokens for b in batches] != [b.tokens for b in padded_batches(encoded, 8, tok.pad_token_id, seed=1)]


def test_packed_rows_restart_positions_and_keep_all_labels(tiny_session):
    tok = tiny_session.tokenizer
    examples = [Example(messages=(("user", f"question {i}"), ("assistant", f"A{i}"))) for i in range(20)]
    encoded = [e for ex in examples for e in encode(tok, ex, 64)]
    batches = packed_batches(encoded, batch_size=2, seq_len=64, pad_id=tok.pad_token_id, seed=0)
    assert all(b.input_ids.shape[1] == 64 and b.attention_mask is None for b in batches)
    labels = sum(int((b.labels != IGNORE).sum()) for b in batches)
    assert labels == sum(sum(label != IGNORE for label in e.labels) for e in encoded)
    assert sum(b.tokens for b in batches) == sum(len(e.input_ids) for e in encoded)
    starts = int((batches[0].position_ids[0] == 0).sum())
    assert starts >= 2  # several examples share the row, each from position 0


def test_packed_examples_do_not_attend_to_each_other(tiny_session):
    """The first example's logits in a packed row equal its logits alone: the mask is block-diagonal."""
    model, tok = tiny_session.model, tiny_session.tokenizer
    a = encode(tok, Example(messages=(("user", "first"), ("assistant", "T1"))), 64)[0]
    b = encode(tok, Example(messages=(("user", "second one"), ("assistant", "T2"))), 64)[0]
    ids = torch.tensor([b.input_ids + a.input_ids])
    pos = torch.tensor([list(range(len(b.input_ids))) + list(range(len(a.input_ids)))])
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0, len(b.input_ids) :]
        alone = model(input_ids=torch.tensor([a.input_ids])).logits[0]
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-4)
