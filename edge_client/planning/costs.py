"""Cost models of LoRA training on a frozen (possibly quantized) base: FLOPs per step, resident bytes.

Pure arithmetic on a model's shape, used by the training planner (`fedge.edge_client.planning.plan`). The constants in
``HOST`` are measured on the reference machine (2 vCPU x86 AVX-512 + AMX-BF16) with the real model by
``benchmarks/plan_calibration.py``; its table in benchmarks/README.md shows predicted against measured.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

GIB = 2**30
LADDER = ("fp32", "bf16", "int8", "int4")  # precisions the planner uses, best quality first
FLOAT_BYTES = {"fp32": 4, "bf16": 2}
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class HostCalibration:
    """Cost-model constants measured on the reference machine (see benchmarks/plan_calibration.py).

    ``train_gflops`` is the *effective* training throughput (model FLOPs of `step_flops` per second, all
    overheads included) per base precision; keys ending in ``-fp32`` are quantized weights computing in
    fp32 (devices without native bf16). Memory constants are bytes.
    """

    train_gflops: dict[str, float]
    runtime_bytes: float  # python + torch imported, nothing loaded (transformers/peft count in the overheads below)
    train_overhead_bytes: float  # allocator caches and workspaces that training adds, whatever the config
    token_bytes: float  # transient bytes per token of a micro-batch beyond the modelled activations
    act_scale: dict[str, float]  # measured / modelled activation bytes, per compute dtype
    logit_bytes: float  # bytes per (labelled position x vocab entry) alive in one LM-head chunk
    load_extra_bytes: dict[str, float]  # load peak - runtime - weights, per precision (transformers, temporaries)
    step_overhead_s: float  # per optimizer step: AdamW on the adapter, python


# Fitted by benchmarks/plan_calibration.py on SmolLM2-135M (its results file as of 2026-11, in git history), LoRA r=16
# on all 7 projections. The 2026-12-01 re-run (results/plan_calibration.json, "fit") on a quieter AMD EPYC host fits
# 2.3-4.6x these throughputs and the same memory constants within 5%: on such hosts these time constants are
# pessimistic (plans leave steps unused; the re-planner adds them back from the measured steps). Throughputs come
# from steps measured while other benchmarks shared the 2 cores, corrected by a matmul probe.
# int8 measured 121 GFLOP/s in one noisy config, above bf16, which it cannot beat (it dequantizes to bf16 and
# then runs bf16 matmuls): capped at bf16's. int8 over fp32 compute was not measured: taken as int4's.
# Memory constants bound every measured peak from above (the overhead is the largest residual of the fit).
HOST = HostCalibration(
    train_gflops={"fp32": 49.7, "bf16": 106.5, "int8": 106.5, "int4": 46.1, "int8-fp32": 48.5, "int4-fp32": 48.5},
    runtime_bytes=233e6,
    train_overhead_bytes=525e6,
    token_bytes=645e3,
    act_scale={"fp32": 1.45, "bf16": 1.45},
    logit_bytes=14.0,
    load_extra_bytes={"fp32": 0.0, "bf16": 670e6, "int8": 683e6, "int4": 613e6},
    step_overhead_s=0.1,
)


@dataclass
class RoundBudget:
    """The round's limits and the federation's fixed settings, as the server sends them.

    Seconds and bytes. ``deadline_s`` covers the whole round on the device: fixed overhead, download of
    the global adapter, training, upload of the update. ``label_fraction`` is the share of tokens that
    carry a loss label (reply tokens; it sizes the LM-head work). ``bytes_per_value`` is what one adapter
    value costs on the wire (4: fp32; less with an update codec).
    """

    deadline_s: float
    steps: int = 15
    batch: int = 8
    seq_len: int = 256
    r_max: int = 16
    targets: tuple[str, ...] = ALL_TARGETS
    memory_cap_bytes: int | None = None
    upload_budget_bytes: int | None = None
    label_fraction: float = 0.5
    bytes_per_value: float = 4.0
    time_margin: float = 0.15  # plan for deadline x (1 - margin)
    memory_margin: float = 0.10  # plan for memory cap x (1 - margin)
    energy_budget_j: float | None = None  # joules the device allows the round (its owner's setting, not the server's)

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        for name in ("steps", "batch", "seq_len", "r_max"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.deadline_s > 0:
            raise ValueError(f"deadline_s must be > 0, got {self.deadline_s}")
        if not self.targets:
            raise ValueError("targets must name at least one module")
        for name in ("time_margin", "memory_margin"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 < self.label_fraction <= 1:
            raise ValueError(f"label_fraction must be in (0, 1], got {self.label_fraction}")
        if self.energy_budget_j is not None and not (math.isfinite(self.energy_budget_j) and self.energy_budget_j > 0):
            raise ValueError(f"energy_budget_j must be a finite number > 0, got {self.energy_budget_j}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_round_settings(cls, settings: object, deadline_s: float, **limits: object) -> RoundBudget:
        """From the federation's `fedge.common.wire.RoundSettings` (steps, batch, seq_len, LoRA rank and targets)
        plus the round's limits (``memory_cap_bytes``, ``upload_budget_bytes``, margins ...)."""
        return cls(
            deadline_s=deadline_s,
            steps=settings.steps,
            batch=settings.batch,
            seq_len=settings.seq_len,
            r_max=settings.lora_r,
            targets=settings.targets,
            **limits,
        )

    @classmethod
    def from_dict(cls, data: dict) -> RoundBudget:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown round budget field(s) {unknown}; expected some of {sorted(names)}")
        return cls(**data)


# --- the model being trained --------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The decoder's dimensions: all the cost models need to know about the model (defaults: SmolLM2-135M).

    ``head_dim`` is the width of one attention head (0: ``hidden // heads``, as in Llama; Gemma and Qwen3 set
    their own). ``tied``: the LM head shares the token embeddings (else it is a second vocab x hidden matrix).
    """

    layers: int = 30
    hidden: int = 576
    intermediate: int = 1536
    vocab: int = 49152
    heads: int = 9
    kv_heads: int = 3
    head_dim: int = 0
    tied: bool = True

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "intermediate", "vocab", "heads", "kv_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"model shape: {name} must be >= 1, got {getattr(self, name)}")
        if self.heads % self.kv_heads:
            raise ValueError(f"model shape: {self.heads} heads do not share {self.kv_heads} KV heads evenly")
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    @classmethod
    def from_hf_config(cls, config: object) -> ModelShape:
        """From a transformers config of a decoder-only LM (Llama, Qwen2/3, Gemma, Mistral, Phi-3 style).

        A multimodal config's ``text_config`` is used when there is one. AttributeError names a missing field.
        """
        config = getattr(config, "text_config", None) or config
        heads = config.num_attention_heads
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or 0,
            tied=bool(getattr(config, "tie_word_embeddings", True)),
        )

    def module_dims(self, name: str) -> tuple[int, int]:
        """(in_features, out_features) of a projection in one decoder layer."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        dims = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
        dims.update({"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)})
        if name not in dims:
            raise ValueError(f"unknown target module {name!r}; expected some of {sorted(dims)}")
        return dims[name]

    @property
    def linear_params(self) -> int:
        """Parameters of all decoder projections (what int8/int4 quantize)."""
        return self.layers * sum(i * o for i, o in map(self.module_dims, ALL_TARGETS))

    @property
    def embed_params(self) -> int:
        """Token embeddings and, if untied, the LM head: they stay in the compute dtype when quantizing."""
        return self.vocab * self.hidden * (1 if self.tied else 2)


SMOLLM2_135M = ModelShape()


# Matmul peak GFLOP/s on the reference machine (FACTS.md): train_gflops / this is the training efficiency.
HOST_MATMUL_GFLOPS = {"fp32": 306.0, "bf16": 1750.0}


def train_gflops_from_matmul(matmul_gflops: dict[str, float], bf16_native: bool) -> dict[str, float]:
    """Effective training GFLOP/s per precision from a device's peak matmul GFLOP/s per dtype."""
    out = {}
    for precision in LADDER:
        compute = compute_dtype(precision, bf16_native)
        if compute in matmul_gflops and (precision != "bf16" or bf16_native):
            key = precision if compute == "bf16" or precision == "fp32" else f"{precision}-fp32"
            out[precision] = HOST.train_gflops[key] * matmul_gflops[compute] / HOST_MATMUL_GFLOPS[compute]
    return out


def compute_dtype(precision: str, bf16_native: bool) -> str:
    """The dtype activations use for a base precision: quantized weights compute in bf16 where it is native."""
    if precision in FLOAT_BYTES:
        return precision
    return "bf16" if bf16_native else "fp32"


@dataclass(frozen=True)
class Knobs:
    """One candidate configuration (without the step count)."""

    precision: str
    checkpointing: bool
    micro_batch: int
    grad_accum: int
    seq_len: int
    layers: int  # trainable top layers
    rank: int


def step_flops(k: Knobs, budget: RoundBudget, model: ModelShape) -> float:
    """Model FLOPs of one optimizer step (all micro-batches) of LoRA training on a frozen base.

    Forward runs all layers; backward (input gradients, plus LoRA weight gradients) runs only the trainable
    top layers, since nothing below them needs a gradient; checkpointing re-runs their forward. The LM head
    runs on labelled positions only, three times (forward, recompute in backward, input gradient).
    """
    dims = [model.module_dims(t) for t in budget.targets]
    linear = 2 * sum(i * o for i, o in map(model.module_dims, ALL_TARGETS))  # per token per layer, forward
    attention = 2 * k.seq_len * model.hidden  # causal QK^T and AV: 2 x (seq/2) x hidden x 2
    lora = 2 * k.rank * sum(i + o for i, o in dims)
    layer_fwd = linear + attention + lora
    per_token = model.layers * layer_fwd + k.layers * (layer_fwd + lora)
    if k.checkpointing:
        per_token += k.layers * layer_fwd
    per_token += 6 * budget.label_fraction * model.hidden * model.vocab
    return per_token * k.micro_batch * k.grad_accum * k.seq_len


def lora_params(k: Knobs, budget: RoundBudget, model: ModelShape) -> int:
    """LoRA values (A and B) on the trainable layers."""
    return k.layers * k.rank * sum(i + o for i, o in map(model.module_dims, budget.targets))


def weight_bytes(precision: str, compute: str, model: ModelShape) -> float:
    """Resident base weights: projections at the precision (int4: 4 bits + a bf16 scale and offset per 32
    weights = 0.625 byte; int8: 1 byte + an fp32 scale per row), embeddings in the compute dtype."""
    per_param = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0 + 4 / model.hidden, "int4": 0.625}[precision]
    return model.linear_params * per_param + model.embed_params * FLOAT_BYTES[compute]


def activation_bytes(k: Knobs, compute: str, model: ModelShape, host: HostCalibration = HOST) -> float:
    """Activations autograd keeps for one micro-batch (they are freed between micro-batches).

    Per token and layer a Llama block with LoRA saves ~10 hidden-sized and 4 intermediate-sized tensors
    (norm inputs/outputs, q/k/v, attention output, gate, up, act(gate), their product). Only the trainable
    layers save anything. With checkpointing, each keeps its input and one layer is recomputed at a time.
    """
    tokens = k.micro_batch * k.seq_len
    per_layer = tokens * (10 * model.hidden + 4 * model.intermediate) * FLOAT_BYTES[compute]
    if k.checkpointing:
        saved = k.layers * tokens * model.hidden * FLOAT_BYTES[compute] + per_layer
    else:
        saved = k.layers * per_layer
    return saved * host.act_scale[compute]


def loss_chunk_for(k: Knobs) -> int:
    """Label positions per LM-head chunk: 1024 (train.py's default), 256 when memory is tight (checkpointing)."""
    return 256 if k.checkpointing else 1024
