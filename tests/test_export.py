"""`fedge export` and the runtimes on a tiny Llama built in code: ONNX (fp32, int8) and GGUF round trips checked
against the merged PyTorch model, the GGUF file read back with gguf-py's reader, and bad input refused in one line
with nothing half-written. (The real default model: tests/test_integration_export.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedge.common import adapters
from fedge.common.errors import FedgeError
from fedge.edge_client.export.build import MANIFEST, ExportRequest, export
from fedge.edge_client.export.runtimes import Sampling, TorchRuntime, open_runtime

pytestmark = pytest.mark.export
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter on the tiny model with non-zero B (a merge that changes the weights)."""
    from fedge.common.modeling import LoraSettings, add_lora, open_model

    cache = tmp_path_factory.mktemp("cache")
    session = open_model(str(tiny_model_dir), cache, precision="fp32", device="cpu")
    model = add_lora(session.model, LoraSettings(r=4, alpha=8, target_modules=TARGETS), seed=0)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return adapters.save_adapter(model, tmp_path_factory.mktemp("a") / "adapter", {"model": session.describe()})


def _export(adapter: Path, out: Path, fmt: str, quantize: str = "none", **kw) -> dict:
    return export(ExportRequest(adapter, fmt, out, quantize, **kw), out.parent / "cache", say=lambda _: None)


def _reference_logits(tiny_model_dir: Path, adapter: Path, ids: list[int]) -> np.ndarray:
    """Logits of base + adapter through PEFT, unmerged: what every export must reproduce."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].numpy()


def test_hf_export_is_the_adapter_merged_into_its_base(tiny_model_dir, tiny_adapter, tmp_path):
    manifest = _export(tiny_adapter, tmp_path / "hf", "hf")
    runtime = TorchRuntime.load(tmp_path / "hf")
    ids = runtime.encode_chat([{"role": "user", "content": "Categorise this reading"}])
    np.testing.assert_allclose(runtime.last_logits(ids), _reference_logits(tiny_model_dir, tiny_adapter, ids),
                               atol=1e-4)  # fmt: skip
    base = TorchRuntime.load(tiny_model_dir)
    assert np.abs(base.last_logits(ids) - runtime.last_logits(ids)).max() > 1e-3, "the adapter changed nothing"
    saved = json.loads((tmp_path / "hf" / MANIFEST).read_text())
    assert saved == manifest and manifest["format"] == "hf" and len(manifest["adapter"]["sha256"]) == 64
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])


def test_onnx_fp32_export_matches_the_merged_model_and_runs_on_onnx_runtime(tiny_model_dir, tiny_adapter, tmp_path):
    manifest = _export(tiny_adapter, tmp_path / "onnx", "onnx", eval_data="demo:iot:test", eval_examples=6)
    assert manifest["parity"]["runtime"] == "ort" and manifest["parity"]["max_abs_logit_diff"] < 1e-3
    assert manifest["parity"]["greedy_same"] == manifest["parity"]["prompts"]
    assert manifest["exact_match"]["examples"] == 6
    runtime = open_runtime(tmp_path / "onnx")
    ids = runtime.encode_chat([{"role": "user", "content": "Categorise this reading"}])
    np.testing.assert_allclose(runtime.last_logits(ids), _reference_logits(tiny_model_dir, tiny_adapter, ids),
                               atol=1e-3)  # fmt: skip
    merged = TorchRuntime.load(tiny_adapter, "fp32", tmp_path / "cache")  # the adapter on its base, in PyTorch
    assert runtime.generate(ids, 12, stop_at_eos=False) == merged.generate(ids, 12, stop_at_eos=False)


def test_onnx_int8_export_is_small_and_answers_like_the_merged_model(tiny_model_dir, tiny_adapter, tmp_path):
    fp32 = _export(tiny_adapter, tmp_path / "fp32", "onnx")
    int8 = _export(tiny_adapter, tmp_path / "int8", "onnx", "int8")
    weights = {name: m["files"]["model.onnx.data"] for name, m in (("int8", int8), ("fp32", fp32))}
    assert weights["int8"] <= 0.45 * weights["fp32"], weights  # embeddings included (real model: 34%)
    assert int8["parity"]["greedy_same"] == int8["parity"]["prompts"]
    assert int8["parity"]["top1_agree"] == int8["parity"]["prompts"]
    reference, runtime = TorchRuntime.load(tiny_model_dir), open_runtime(tmp_path / "int8")
    ids = runtime.encode_chat([{"role": "user", "content": "Summarise the ledger"}])
    assert len(runtime.generate(ids, 8, stop_at_eos=False)) == 8
    assert reference.name == "torch_fp32" and runtime.name == "ort"


def test_gguf_export_reads_back_with_the_gguf_reader(tiny_model_dir, tiny_adapter, tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM

    manifest = _export(tiny_adapter, tmp_path / "gguf", "gguf", "int8")
    (name,) = [f for f in manifest["files"] if f.endswith(".gguf")]
    reader = gguf.GGUFReader(tmp_path / "gguf" / name)
    fields = {f.name: f for f in reader.fields.values()}
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert int(fields["llama.block_count"].parts[-1][0]) == 2
    assert (
        len(fields["tokenizer.ggml.tokens"].data)
        == AutoModelForCausalLM.from_pretrained(tiny_model_dir).config.vocab_size
    )
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd
    # The q rows, dequantized and put back in transformers' order, are the merged weights.
    q = gguf.quants.dequantize(tensors["blk.0.attn_q.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    heads = 4
    q = q.reshape(heads, q.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(q.shape)  # undo the permute
    from peft import PeftModel

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tiny_adapter)
    expected = peft.merge_and_unload().model.layers[0].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_allclose(q, expected, atol=np.abs(expected).max() / 100)
    assert manifest["parity"]["runtime"] in ("torch_gguf", "llama_cpp")
    assert manifest["parity"]["greedy_same"] == manifest["parity"]["prompts"]


def test_sampling_is_seeded_and_greedy_is_deterministic(tiny_model_dir):
    runtime = TorchRuntime.load(tiny_model_dir)
    ids = runtime.encode_chat([{"role": "user", "content": "hello"}])
    a = runtime.generate(ids, 10, Sampling(temperature=1.5, top_p=0.95, seed=7), stop_at_eos=False)
    b = runtime.generate(ids, 10, Sampling(temperature=1.5, top_p=0.95, seed=7), stop_at_eos=False)
    c = runtime.generate(ids, 10, Sampling(temperature=1.5, top_p=0.95, seed=8), stop_at_eos=False)
    assert a == b and a != c
    assert runtime.generate(ids, 10) == runtime.generate(ids, 10)


# --- bad input: one line, exit 2, nothing half-written -----------------------------------------------------------


def _fedge(*args: str, env_cache: Path) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "FEDGE_CACHE": str(env_cache)}
    return subprocess.run([sys.executable, "-m", "fedge", *args], capture_output=True, text=True, env=env, timeout=300)


def test_an_adapter_whose_base_is_not_cached_is_refused_in_one_line(tiny_adapter, tmp_path):
    meta = json.loads((tiny_adapter / adapters.META_FILE).read_text())
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    for f in tiny_adapter.iterdir():
        (orphan / f.name).write_bytes(f.read_bytes())
    (orphan / adapters.META_FILE).write_text(json.dumps({**meta, "model": {"source": "smollm2-135m"}}))
    done = _fedge("export", "--adapter", str(orphan), "--format", "onnx", "--out", str(tmp_path / "out"),
                  env_cache=tmp_path / "empty-cache")  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr + done.stdout
    said = done.stdout + done.stderr
    assert "not in the model cache" in said and "fedge model pull smollm2-135m" in said and len(said.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_unwritable_out_and_not_an_adapter_are_refused(tiny_adapter, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)).save_pretrained(gpt2)
    from fedge.edge_client.export.gguf_export import write_gguf

    with pytest.raises(FedgeError, match="not GPT2LMHeadModel"):
        write_gguf(gpt2, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf*"))
    done = _fedge("export", "--adapter", str(tiny_adapter), "--format", "gguf", "--out", "/proc/fedge-export",
                  env_cache=tmp_path / "c")  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stdout + done.stderr and "/proc/fedge-export" in done.stderr
    done = _fedge("export", "--adapter", str(tmp_path), "--format", "hf", "--out", str(tmp_path / "o"),
                  env_cache=tmp_path / "c")  # fmt: skip
    assert done.returncode == 2 and "not an adapter directory" in done.stderr
    done = _fedge("export", "--adapter", str(tiny_adapter), "--format", "hf", "--quantize", "int8", "--out",
                  str(tmp_path / "o"), env_cache=tmp_path / "c")  # fmt: skip
    assert done.returncode == 2 and "--quantize needs --format onnx or gguf" in done.stderr
    done = _fedge("export", "--adapter", str(tiny_adapter), "--format", "onnx", "--out", str(tmp_path / "o"),
                  "--eval-data", str(tmp_path / "missing.jsonl"), env_cache=tmp_path / "c")  # fmt: skip
    assert done.returncode == 2 and "missing.jsonl: no such file" in done.stderr and not (tmp_path / "o").exists()
    assert "merging" not in done.stdout + done.stderr  # refused before any work
    done = _fedge("generate", "--model", str(tmp_path / "nothing"), "--prompt", "hi", env_cache=tmp_path / "c")
    assert done.returncode == 2 and "not a model fedge can run" in done.stderr


def test_a_failed_export_leaves_the_previous_one_and_no_partial_files(tiny_adapter, tmp_path, monkeypatch):
    from fedge.edge_client.export import build as export_module

    out = tmp_path / "exports" / "model"
    out.parent.mkdir()
    first = _export(tiny_adapter, out, "hf")

    def broken(*_a, **_k):
        raise FedgeError("the hf export's logits differ from the merged model's: the conversion is broken")

    monkeypatch.setattr(export_module, "check_parity", broken)
    with pytest.raises(FedgeError, match="conversion is broken"):
        _export(tiny_adapter, out, "hf")
    assert json.loads((out / MANIFEST).read_text()) == first
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]  # no staging or work directories


def test_inference_profile_measures_each_runtime_in_its_own_process(tiny_model_dir, tiny_adapter, tmp_path):
    from fedge.export_cli import inference_profile

    _export(tiny_adapter, tmp_path / "int8", "onnx", "int8")
    rows = inference_profile([tiny_model_dir, tmp_path / "int8", tmp_path / "nothing"], tmp_path / "c", 6, 1)
    assert [r.get("runtime") for r in rows] == ["torch_fp32", "torch_bf16", "ort", None]
    for row in rows[:3]:
        assert row["decode_tokens_per_s"] > 0 and row["first_token_ms"] > 0 and row["peak_rss_mb"] > 50
        assert row["new_tokens"] == 6 and row["j_per_token"] >= 0
    assert "not a model fedge can run" in rows[3]["error"]
