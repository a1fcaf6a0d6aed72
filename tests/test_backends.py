"""Unit tests for fedge.quantization.backends: hardware probes, precision resolution, loading per precision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fedge.quantization import backends
from fedge.quantization.backends import (
    PRECISIONS,
    BackendUnavailable,
    compute_dtype_for,
    cpu_supports_bf16,
    is_bitsandbytes_available,
    load_base_model,
    pick_device,
    resolve_precision,
)
from fedge.quantization.portable import Int4Linear, Int8Linear

CPU = torch.device("cpu")

# Trimmed /proc/cpuinfo texts: a Sapphire Rapids VM, a Zen 4 (AVX512-BF16, no AMX), an older
# AVX-512 Xeon, a Graviton 3 (aarch64 with BF16) and a Raspberry Pi 5 (Cortex-A76, no BF16).
X86_AMX = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
X86_AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"
X86_NO_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd aes sha2 asimddp sve i8mm bf16 dcpop\n"
PI5 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics lrcpc dcpop asimddp\n"


def tiny_llama_dir(root: Path) -> Path:
    """Save a 2-layer random Llama (hidden 64, vocab 128, tied embeddings, fp32) to `root` and return it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"))


# --- probes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cpuinfo", "expected"),
    [
        (X86_AMX, True),
        (X86_AVX512_BF16, True),
        (X86_NO_BF16, False),
        (ARM_BF16, True),
        (PI5, False),
        ("", False),
    ],
)
def test_cpu_supports_bf16_reads_flags(cpuinfo: str, expected: bool) -> None:
    assert cpu_supports_bf16(cpuinfo) is expected


def test_cpu_supports_bf16_ignores_flag_names_outside_flag_lines() -> None:
    assert not cpu_supports_bf16("model name\t: imaginary amx_bf16 chip\nflags\t\t: sse2\n")


def test_compute_dtype_for_cpu_follows_cpuinfo() -> None:
    assert compute_dtype_for(CPU, X86_AMX) == torch.bfloat16
    assert compute_dtype_for(CPU, PI5) == torch.float32


def test_pick_device_honours_explicit_cpu_and_rejects_missing_cuda() -> None:
    assert pick_device("cpu") == CPU
    assert pick_device("auto").type in ("cuda", "mps", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            pick_device("cuda")


def test_is_bitsandbytes_available_returns_bool() -> None:
    assert isinstance(is_bitsandbytes_available(), bool)


# --- resolve_precision ----------------------------------------------------------------------------


def test_resolve_precision_rejects_unknown_name_listing_choices() -> None:
    with pytest.raises(ValueError, match="int4") as excinfo:
        resolve_precision("q4", CPU)
    assert all(name in str(excinfo.value) for name in PRECISIONS)


@pytest.mark.parametrize(("bf16_cpu", "expected"), [(True, "bf16"), (False, "fp32")])
def test_resolve_auto_picks_bf16_only_where_fast(
    monkeypatch: pytest.MonkeyPatch, bf16_cpu: bool, expected: str
) -> None:
    monkeypatch.setattr(backends, "cpu_supports_bf16", lambda cpuinfo=None: bf16_cpu)
    assert resolve_precision("auto", CPU) == expected


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "int8", "int4"])
def test_resolve_concrete_precision_is_unchanged(precision: str) -> None:
    assert resolve_precision(precision, CPU) == precision


@pytest.mark.parametrize("precision", ["bnb-int8", "bnb-nf4"])
def test_resolve_bnb_without_working_bitsandbytes_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    monkeypatch.setattr(backends, "_bitsandbytes_error", lambda device_type: "ImportError: no bitsandbytes")
    with pytest.raises(BackendUnavailable) as excinfo:
        resolve_precision(precision, CPU)
    message = str(excinfo.value)
    assert "pip install 'fedge[bnb]'" in message and "'int4'" in message
    assert isinstance(excinfo.value, ValueError)  # callers catching input errors catch this too


# --- load_base_model ------------------------------------------------------------------------------

_BNB_REASON = "bitsandbytes does not work on this machine (see fedge.quantization.backends.is_bitsandbytes_available)"
_needs_bnb = pytest.mark.skipif(not is_bitsandbytes_available(), reason=_BNB_REASON)


@pytest.mark.parametrize(
    ("precision", "weight_dtype"),
    [
        ("fp32", torch.float32),
        ("bf16", torch.bfloat16),
        ("fp16", torch.float16),
        ("int8", torch.int8),
        ("int4", torch.uint8),
        pytest.param("bnb-int8", torch.int8, marks=_needs_bnb),
        pytest.param("bnb-nf4", torch.uint8, marks=_needs_bnb),
    ],
)
def test_load_base_model_each_precision(model_dir: Path, precision: str, weight_dtype: torch.dtype) -> None:
    loaded = load_base_model(model_dir, precision, CPU)
    model = loaded.model
    assert loaded.precision == precision and loaded.device == CPU
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == weight_dtype
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training
    # Embeddings (and the tied lm_head) stay in the compute dtype; only projections are quantized.
    assert model.model.embed_tokens.weight.dtype == loaded.compute_dtype
    with torch.no_grad():
        logits = model(torch.randint(0, 128, (1, 8))).logits
    assert logits.shape == (1, 8, 128) and torch.isfinite(logits).all()


def test_load_base_model_portable_int_paths_use_quantized_layers(model_dir: Path) -> None:
    int8 = load_base_model(model_dir, "int8", CPU)
    int4 = load_base_model(model_dir, "int4", CPU, group_size=32)
    assert isinstance(int8.model.model.layers[1].mlp.down_proj, Int8Linear)
    assert isinstance(int4.model.model.layers[1].mlp.down_proj, Int4Linear)
    assert int4.model.model.layers[1].mlp.down_proj.group_size == 32
    assert type(int4.model.lm_head) is nn.Linear
    assert int4.compute_dtype == compute_dtype_for(CPU)


def test_load_base_model_weight_bytes_shrink_with_precision(model_dir: Path) -> None:
    sizes = {p: load_base_model(model_dir, p, CPU).weight_bytes for p in ("fp32", "bf16", "int4")}
    assert sizes["int4"] < sizes["bf16"] < sizes["fp32"]


def test_load_base_model_auto_resolves(model_dir: Path) -> None:
    loaded = load_base_model(model_dir, "auto", CPU)
    assert loaded.precision in ("bf16", "fp32")
    assert loaded.compute_dtype == {"bf16": torch.bfloat16, "fp32": torch.float32}[loaded.precision]


def test_load_base_model_rejects_unknown_precision_before_reading(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown precision"):
        load_base_model(tmp_path, "int3", CPU)
