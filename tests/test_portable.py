"""Unit tests for fedge.quantization.portable: error bounds, autograd memory, peft LoRA on quantized layers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from fedge.quantization.portable import (
    Int4Linear,
    Int8Linear,
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
    quantize_linears_,
)


def tiny_llama(seed: int = 0) -> nn.Module:
    """A 2-layer Llama (hidden 64, vocab 128, tied embeddings) with random weights, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
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
    return LlamaForCausalLM(config).eval()


def rel_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx.float() - exact.float()).norm() / exact.float().norm()).item()


# --- quantize / dequantize bounds ---------------------------------------------------------------
#
# Rounding to a grid of step d leaves an error uniform in [-d/2, d/2]: rms d / sqrt(12).
# int8, per row: d = max|w| / 127. For 256 standard-normal values max|w| < 4.5 sigma (P > 0.99 per
# row... and 3.5 sigma typical), so the relative rms error is below 4.5 / (127 * sqrt(12)) = 0.0102.
# int4, groups of 64 with 16 levels: d = (max - min) / 15, and the range of 64 normals is ~4.9 sigma,
# so the relative rms error is ~4.9 / (15 * sqrt(12)) = 0.094; 0.11 leaves room for wide groups.
INT8_REL_BOUND = 4.5 / (127 * math.sqrt(12))
INT4_REL_BOUND = 0.11


def test_int8_roundtrip_error_within_half_step_and_rms_bound() -> None:
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(1))
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scales.shape == (96,)
    back = dequantize_int8(q, scales, torch.float32)
    # Every element lands within half a step of its row's grid.
    assert ((back - w).abs() <= scales[:, None] / 2 * (1 + 1e-5)).all()
    assert rel_error(back, w) < INT8_REL_BOUND


def test_int4_roundtrip_error_within_bounds() -> None:
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(2))
    packed, scale, offset = quantize_int4(w, group_size=64)
    assert packed.dtype == torch.uint8 and packed.shape == (96, 4, 32)  # two values per byte
    back = dequantize_int4(packed, scale, offset, 256, torch.float32)
    step = scale[..., 0].float().repeat_interleave(64, dim=1)  # (96, 256)
    # Half a step, plus slack for the bf16-rounded scale/offset (<= 15 * 2**-8 of a step at the top).
    assert ((back - w).abs() <= step * (0.5 + 15 * 2**-8) + 1e-6).all()
    assert rel_error(back, w) < INT4_REL_BOUND


def test_int4_pads_in_features_not_divisible_by_group() -> None:
    w = torch.randn(8, 100)
    packed, scale, offset = quantize_int4(w, group_size=64)
    assert packed.shape == (8, 2, 32)
    back = dequantize_int4(packed, scale, offset, 100, torch.float32)
    assert back.shape == (8, 100)
    assert rel_error(back, w) < INT4_REL_BOUND


def test_int4_rejects_odd_group_size() -> None:
    with pytest.raises(ValueError, match="group_size"):
        quantize_int4(torch.randn(4, 30), group_size=15)


def test_zero_weight_quantizes_to_zero() -> None:
    w = torch.zeros(4, 64)
    assert dequantize_int8(*quantize_int8(w), torch.float32).abs().max() == 0
    assert dequantize_int4(*quantize_int4(w), 64, torch.float32).abs().max() < 1e-9


# --- layers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_layer_is_a_linear_with_integer_weight_and_matching_forward_backward(cls: type) -> None:
    linear = nn.Linear(128, 48, bias=True)
    layer = cls.from_linear(linear)
    assert isinstance(layer, nn.Linear)
    assert (layer.in_features, layer.out_features) == (128, 48)
    assert not layer.weight.is_floating_point() and not layer.weight.requires_grad
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = layer(x)
    w = layer.dequantize(torch.float32)
    expected = nn.functional.linear(x, w, layer.bias)
    torch.testing.assert_close(y, expected)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    torch.testing.assert_close(x.grad, grad_out @ w)
    assert layer.weight.grad is None


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_autograd_saves_no_dequantized_weight(cls: type) -> None:
    layer = cls.from_linear(nn.Linear(128, 256, bias=False))
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    x = torch.randn(2, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    # A saved (256, 128) float tensor would mean autograd kept the whole dequantized weight alive.
    assert not [t for t in saved if t.is_floating_point() and t.numel() >= 256 * 128]


def test_layer_follows_input_dtype_and_autocast() -> None:
    layer = Int4Linear.from_linear(nn.Linear(64, 32))
    assert layer(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(2, 64)).dtype == torch.bfloat16


# --- whole models -------------------------------------------------------------------------------


@pytest.mark.parametrize(("bits", "bound"), [(8, 0.02), (4, 0.15)])
def test_quantized_model_logits_close_to_fp32(bits: int, bound: float) -> None:
    # Measured: 0.006 (int8) and 0.076 (int4) relative error on this model; bounds leave ~2x room.
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
        quantized = quantize_linears_(copy.deepcopy(model), bits)
        logits = quantized(ids).logits
    cls = Int8Linear if bits == 8 else Int4Linear
    layers = [m for m in quantized.modules() if isinstance(m, cls)]
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert type(quantized.lm_head) is nn.Linear
    assert quantized.lm_head.weight is quantized.model.embed_tokens.weight  # tie survives
    assert rel_error(logits, reference) < bound


def test_quantize_linears_casts_unquantized_parameters_to_compute_dtype() -> None:
    model = quantize_linears_(tiny_llama(), 4, compute_dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in model.parameters())
    assert model(torch.randint(0, 128, (1, 8))).logits.dtype == torch.bfloat16


def test_quantize_linears_rejects_unknown_bits() -> None:
    with pytest.raises(ValueError, match="bits"):
        quantize_linears_(tiny_llama(), 3)


def test_peft_lora_trains_on_int4_base() -> None:
    from peft import LoraConfig, get_peft_model

    base = quantize_linears_(tiny_llama(), 4)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, Int4Linear)
    assert q_proj.lora_A["default"].weight.dtype == torch.float32  # peft did not cast to uint8
    model.train()
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        # lora_B starts at zero, so lora_A's gradient is zero until lora_B has taken a step.
        assert q_proj.lora_B["default"].weight.grad.abs().sum() > 0
        if losses:
            assert q_proj.lora_A["default"].weight.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
