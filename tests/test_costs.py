"""Cost models: parameter counts of the real model, and the direction each knob moves time and memory."""

from __future__ import annotations

import dataclasses

import pytest

from fedge.edge_client.planning.costs import (
    SMOLLM2_135M,
    Knobs,
    ModelShape,
    activation_bytes,
    compute_dtype,
    step_flops,
    train_gflops_from_matmul,
    weight_bytes,
)
from fedge.edge_client.planning.plan import RoundBudget

TOP = Knobs("bf16", False, 8, 1, 256, 30, 16)
BUDGET = RoundBudget(deadline_s=60)


def test_smollm2_shape_counts_its_parameters():
    norms = 30 * 2 * 576 + 576
    assert SMOLLM2_135M.linear_params + SMOLLM2_135M.embed_params + norms == 134_515_008  # transformers' count
    assert SMOLLM2_135M.module_dims("k_proj") == (576, 192)  # 3 of 9 heads share keys and values


def test_model_shape_from_a_transformers_config():
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    shape = ModelShape.from_hf_config(config)
    assert (shape.layers, shape.hidden, shape.kv_heads) == (2, 64, 2)
    assert shape.module_dims("v_proj") == (64, 32)


def test_weight_bytes_shrink_with_precision():
    fp32, bf16, int8, int4 = (weight_bytes(p, "bf16" if p != "fp32" else "fp32", SMOLLM2_135M) for p in
                              ("fp32", "bf16", "int8", "int4"))  # fmt: skip
    assert fp32 > bf16 > int8 > int4
    assert fp32 == pytest.approx(4 * 134.48e6, rel=1e-3)
    assert int4 == pytest.approx(106.17e6 * 0.625 + 28.31e6 * 2, rel=1e-3)  # embeddings stay bf16


def test_checkpointing_trades_flops_for_activation_memory():
    ckpt = dataclasses.replace(TOP, checkpointing=True)
    assert activation_bytes(ckpt, "bf16", SMOLLM2_135M) < activation_bytes(TOP, "bf16", SMOLLM2_135M) / 5
    assert step_flops(ckpt, BUDGET, SMOLLM2_135M) > step_flops(TOP, BUDGET, SMOLLM2_135M) * 1.2


def test_fewer_trainable_layers_cost_less_time_and_memory():
    top8 = dataclasses.replace(TOP, layers=8)
    assert step_flops(top8, BUDGET, SMOLLM2_135M) < step_flops(TOP, BUDGET, SMOLLM2_135M) * 0.7
    assert activation_bytes(top8, "bf16", SMOLLM2_135M) == pytest.approx(
        activation_bytes(TOP, "bf16", SMOLLM2_135M) * 8 / 30
    )


def test_compute_dtype_and_profiler_matmul_conversion():
    assert compute_dtype("int4", bf16_native=False) == "fp32" and compute_dtype("int4", True) == "bf16"
    assert compute_dtype("fp32", True) == "fp32"
    gflops = train_gflops_from_matmul({"fp32": 306.0, "bf16": 1750.0}, bf16_native=True)
    assert set(gflops) == {"fp32", "bf16", "int8", "int4"}
    assert "bf16" not in train_gflops_from_matmul({"fp32": 30.0, "bf16": 5.0}, bf16_native=False)
