"""The ``fedge`` command as a user runs it: a real adapter from a JSONL file, and clear errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edge_client.adapters import META_FILE, read_meta
from edge_client.cli import main


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture()
def user_data(tmp_path):
    from edge_client.demo_data import generate

    return _jsonl(tmp_path / "my.jsonl", generate("finance", "train", n=120))


def test_train_on_a_users_jsonl_lowers_heldout_loss_and_saves_a_peft_adapter(tiny_model_dir, user_data, tmp_path):
    out = tmp_path / "adapter"
    code = main(
        [
            "--cache-dir",
            str(tmp_path / "cache"),
            "train",
            "--data",
            str(user_data),
            "--model",
            str(tiny_model_dir),
            "--steps",
            "15",
            "--lr",
            "1e-2",
            "--rank",
            "8",
            "--batch",
            "8",
            "--targets",
            "q_proj,v_proj,up_proj,down_proj",
            "--precision",
            "fp32",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    meta = read_meta(out)
    assert meta["metrics"]["after"]["loss"] < meta["metrics"]["before"]["loss"] - 0.3
    assert meta["lora"]["r"] == 8 and len(meta["data"]["fingerprint"]) == 64 and meta["data"]["examples"] == 108
    assert not (tmp_path / ".adapter.progress").exists()  # resumable state is removed once the adapter is saved

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(base, out)  # plain PEFT format
    assert any("lora_A" in n for n, _ in loaded.named_parameters())

    code = main(
        [
            "--cache-dir",
            str(tmp_path / "cache"),
            "eval",
            "--data",
            str(user_data),
            "--adapter",
            str(out),
            "--model",
            str(tiny_model_dir),
            "--precision",
            "fp32",
            "--limit",
            "20",
        ]
    )
    assert code == 0


BAD_INPUTS = {
    "malformed JSONL": ('{"text": "a"}\n{oops\n', "my.jsonl:2: not valid JSON"),
    "empty file": ("", "my.jsonl: no examples"),
    "wrong fields": ('{"question": "q", "answer": "a"}\n', "my.jsonl:1: expected one of the fields"),
    "non-UTF-8 bytes": (b'{"text": "\xff\xfe"}\n', "my.jsonl:1: not UTF-8"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_data_is_one_clear_line_and_exit_2(case, tmp_path, tiny_model_dir, capsys):
    content, expected = BAD_INPUTS[case]
    data = tmp_path / "my.jsonl"
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    code = main(["train", "--data", str(data), "--model", str(tiny_model_dir), "--out", str(tmp_path / "ad")])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err
    assert not (tmp_path / "ad").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--data", "MISSING.jsonl"], "no such file"),
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--model", "/nonexistent/model.gguf"], "no such file or directory"),
        (["--steps", "0"], "steps must be >= 1"),
        (["--out", "FILE/adapter"], "cannot write the adapter here"),
    ],
)
def test_bad_arguments_are_clear_errors(args, expected, user_data, tmp_path, tiny_model_dir, capsys):
    blocker = tmp_path / "FILE"
    blocker.write_text("a file, so nothing can be created below it")
    argv = [
        "--cache-dir",
        str(tmp_path / "cache"),
        "train",
        "--data",
        str(user_data),
        "--model",
        str(tiny_model_dir),
        "--out",
        str(tmp_path / "ad"),
    ]
    for flag, value in zip(args[::2], args[1::2]):
        value = str(tmp_path / value) if value.startswith(("MISSING", "FILE")) else value
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err


def test_data_sample_and_export(tmp_path, capsys):
    assert main(["data", "sample", "iot", "--n", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["output"] for line in lines)
    out = tmp_path / "sub" / "iot.jsonl"
    assert main(["data", "export", "iot", str(out), "--split", "test"]) == 0
    assert len(out.read_text().splitlines()) > 10
    assert main(["data", "sample", "mars"]) == 2
    assert "mars" in capsys.readouterr().err


def test_eval_rejects_a_directory_that_is_not_an_adapter(tmp_path, user_data, capsys):
    code = main(["eval", "--data", str(user_data), "--adapter", str(tmp_path)])
    assert code == 2 and "not an adapter directory" in capsys.readouterr().err


def test_console_script_runs_without_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "edge_client.cli", "train", "--data", str(tmp_path / "x.jsonl")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "no such file" in done.stderr and "Traceback" not in done.stderr


def test_meta_file_name_is_stable():
    assert META_FILE == "fedge_adapter.json"
