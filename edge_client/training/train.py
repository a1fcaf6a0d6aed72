"""Local LoRA training: a plain loop (no HF Trainer) with a memory-lean loss and resumable progress.

The loop: micro-batches -> lean loss on reply tokens only -> backward -> (accumulate) -> clip -> AdamW.
The loss never builds full-vocabulary logits for every position: it runs the decoder body, keeps the
hidden states of positions that have a label, and applies the LM head to those in chunks, each chunk
recomputed in backward (checkpointed) so at most one chunk of logits is alive at a time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fedge.common.fsutil import atomic_write_bytes
from fedge.common.modeling import LoraSettings
from fedge.edge_client.training.data import IGNORE, Batch
from fedge.edge_client.training.memory import peak_rss_mb

STATE_FILE = "train-state.pt"


@dataclass
class TrainConfig:
    """One local training run. Steps count optimizer updates; each is ``grad_accum`` micro-batches."""

    steps: int = 100
    micro_batch: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    lr_schedule: str = "cosine"  # "cosine" (decays to 10% after warm-up) or "constant"
    max_grad_norm: float = 1.0
    seq_len: int = 256
    pack: bool = False
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder layer: fuses the elementwise ops that dominate a CPU step
    loss_chunk: int = 1024  # label positions per LM-head chunk; bounds logits memory at chunk x vocab x 4 bytes
    seed: int = 0
    checkpoint_every: int = 50  # steps between resumable checkpoints (0: never)
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        for name in ("steps", "micro_batch", "grad_accum", "seq_len", "loss_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if self.seq_len < 16:
            raise ValueError(f"seq_len must be >= 16, got {self.seq_len}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown training config field(s) {unknown}; expected some of {sorted(names)}")
        return cls(**data)


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    losses: list[float]
    peak_rss_mb: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def final_loss(self) -> float:
        """Mean loss of the last 10% of steps (at least one): less noisy than the last step alone."""
        tail = self.losses[-max(1, len(self.losses) // 10) :]
        return sum(tail) / len(tail)


def compile_available(device: torch.device) -> bool:
    """True if torch.compile can generate kernels here: a C++ compiler on CPU, triton on CUDA."""
    import importlib.util
    import shutil

    if device.type == "cpu":
        return any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))
    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return False


# Eager attention keeps every layer's (batch, heads, seq, seq) softmax for backward: it is used under compile on CPU
# while that stays under this (fp32 bytes; 283 MB for SmolLM2-135M at 4 x 256), SDPA beyond it
EAGER_ATTENTION_BYTES = 512 * 2**20


def compile_layers(model: torch.nn.Module, device: torch.device | None = None, rows: int = 0, seq_len: int = 0) -> None:
    """Compile each decoder layer in place ("regional" compilation).

    The layers share one class and shapes, so one compiled graph serves all of them: compile time is
    that of one layer (~40 s on 2 cores), not of the whole model. On CPU most of a LoRA step is not the
    matmuls but norms, rotary, casts and LoRA's adds, which the compiler fuses into a few loops.

    On CPU, for micro-batches of ``rows`` x ``seq_len`` whose attention weights fit `EAGER_ATTENTION_BYTES`, the
    model switches to eager attention first: the compiler cannot look into SDPA's CPU flash kernel, whose masked
    backward alone took a third of a bf16 step (4 x 256 packed tokens, 2 cores), while eager attention's mask,
    softmax and casts fuse around two batched matmuls (benchmarks/train_step.py: 4.15x the naive loop against
    3.10x with SDPA). Longer rows go back to SDPA, which keeps no (seq x seq) weights.
    """
    if device is not None and device.type == "cpu":
        _choose_attention(model, rows, seq_len)
    body, _ = body_and_head(model)
    layers = getattr(body, "layers", None)
    if layers is None:
        body.compile()
        return
    for layer in layers:
        layer.compile()


def _choose_attention(model: torch.nn.Module, rows: int, seq_len: int) -> None:
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = lm.config
    if not hasattr(lm, "set_attn_implementation") or config._attn_implementation not in ("eager", "sdpa"):
        return  # another kernel the user chose (e.g. flash_attention_2): left alone
    weights = config.num_hidden_layers * rows * config.num_attention_heads * seq_len**2 * 4
    wanted = "eager" if weights <= EAGER_ATTENTION_BYTES else "sdpa"
    if config._attn_implementation != wanted:
        try:
            lm.set_attn_implementation(wanted)
        except (ValueError, ImportError):  # a model without SDPA support stays as it is
            pass


def body_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The decoder stack (ending in its final norm) and the LM head of a (peft-wrapped) causal LM."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return lm.get_decoder(), lm.get_output_embeddings()


def lean_loss(model: torch.nn.Module, batch: Batch, chunk: int) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and how many there are.

    Returns (loss_sum, n_labels); divide by the step's total labels for a mean. Logits are built only
    for labelled positions, ``chunk`` at a time, in fp32 for a stable log-softmax.
    """
    body, head = body_and_head(model)
    hidden = body(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).last_hidden_state  # (batch, seq, hidden)
    targets = batch.labels[:, 1:]  # position t predicts token t+1
    keep = targets != IGNORE  # (batch, seq-1)
    picked = hidden[:, :-1][keep]  # (n_labels, hidden)
    labels = targets[keep]  # (n_labels,)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, labels.numel(), chunk):
        h, y = picked[start : start + chunk], labels[start : start + chunk]
        if torch.is_grad_enabled():
            total = total + checkpoint(_head_ce, head, h, y, use_reentrant=False)
        else:
            total = total + _head_ce(head, h, y)
    return total, int(labels.numel())


def _head_ce(head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()  # (chunk, vocab)
    return F.cross_entropy(logits, y, reduction="sum")


def micro_batches(make_epoch: Callable[[int], Sequence[Batch]]) -> Iterator[Batch]:
    """Endless micro-batches: epoch e is ``make_epoch(e)`` (shuffled with a seed derived from e)."""
    epoch = 0
    while True:
        batches = make_epoch(epoch)
        if not batches:
            raise ValueError("no training batches: the data produced no examples")
        yield from batches
        epoch += 1


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then constant or cosine decay to 10% of the peak learning rate."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# (step, loss, tokens, seconds) -> True to stop after this step (e.g. a re-planned step count was reached)
StepCallback = Callable[[int, float, int, float], bool | None]


def train(
    model: torch.nn.Module,
    make_epoch: Callable[[int], Sequence[Batch]],
    cfg: TrainConfig,
    device: torch.device,
    state_dir: Path | None = None,
    on_step: StepCallback | None = None,
    run_id: str = "",
    optimizer_state: dict | None = None,
) -> TrainResult:
    """Train the model's trainable (LoRA) parameters for ``cfg.steps`` optimizer steps.

    If ``state_dir`` holds a checkpoint of an earlier run with the same config and ``run_id`` (name the
    model and data in it, e.g. their fingerprints), training resumes from it;
    progress is saved there every ``cfg.checkpoint_every`` steps (atomically) and at the end.
    ``on_step`` runs after each optimizer step; if it returns ``True`` (exactly), training ends after that step (the
    result then counts the steps done, and the learning-rate schedule stays the one for ``cfg.steps``).
    ``optimizer_state``, if given, carries AdamW's moments from one call to the next (a client that keeps them
    across rounds): a non-empty dict is loaded before the first step, and the dict is refilled at the end.
    """
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, cfg))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif getattr(model, "is_gradient_checkpointing", False):  # a kept model: an earlier run (plan) turned it on
        model.gradient_checkpointing_disable()
    if cfg.compile:
        compile_layers(model, device, cfg.micro_batch, cfg.seq_len)
    model.train()
    start_step, losses, tokens, seconds = 0, [], 0, 0.0
    if state_dir is not None:
        start_step, losses, tokens, seconds = _load_state(state_dir, _run_key(cfg, run_id), model, optimizer, scheduler)
    if optimizer_state and start_step == 0:  # a resumed checkpoint's own moments are newer
        _load_moments(optimizer, optimizer_state, params)
    stream = micro_batches(make_epoch)
    for _ in range(start_step * cfg.grad_accum):  # replay the data order up to the resumed step
        next(stream)
    for step in range(start_step, cfg.steps):
        t0 = time.perf_counter()
        group = [next(stream).to(device) for _ in range(cfg.grad_accum)]
        n_labels = sum(int((b.labels[:, 1:] != IGNORE).sum()) for b in group)
        step_loss = 0.0
        for batch in group:
            loss_sum, _ = lean_loss(model, batch, cfg.loss_chunk)
            (loss_sum / max(1, n_labels)).backward()
            step_loss += loss_sum.item()
        if cfg.max_grad_norm > 0:  # 0 disables clipping
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        batch_tokens = sum(b.tokens for b in group)
        losses.append(step_loss / max(1, n_labels))
        tokens += batch_tokens
        seconds += dt
        # `is True`, not truthiness: callbacks written before stopping existed may return anything (e.g. a tuple)
        stop = on_step is not None and on_step(step + 1, losses[-1], batch_tokens, dt) is True
        done = stop or step + 1 == cfg.steps
        if state_dir is not None and (done or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0)):
            _save_state(
                state_dir,
                _run_key(cfg, run_id),
                step + 1,
                losses,
                tokens,
                seconds,
                model,
                optimizer,
                scheduler,
            )
        if stop:
            break
    if optimizer_state is not None:
        optimizer_state.clear()
        optimizer_state.update(state=optimizer.state_dict()["state"], shapes=[tuple(p.shape) for p in params])
    model.eval()
    return TrainResult(len(losses), tokens, seconds, losses, peak_rss_mb())


def _load_moments(optimizer: torch.optim.Optimizer, kept: dict, params: list[torch.Tensor]) -> None:
    """Load kept AdamW moments (keyed by parameter index) into ``optimizer``, this call's lr and schedule kept."""
    shapes = [tuple(p.shape) for p in params]
    if kept.get("shapes") != shapes:
        raise ValueError(
            f"optimizer_state is for {len(kept.get('shapes') or [])} trainable tensors of other shapes than "
            f"these {len(shapes)}: the kept moments belong to another adapter"
        )
    optimizer.load_state_dict({"state": kept["state"], "param_groups": optimizer.state_dict()["param_groups"]})


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _run_key(cfg: TrainConfig, run_id: str) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True) + "|" + run_id


def _save_state(state_dir, key, step, losses, tokens, seconds, model, optimizer, scheduler) -> None:
    import io

    state_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(
        {
            "key": key,
            "step": step,
            "losses": losses,
            "tokens": tokens,
            "seconds": seconds,
            "trainable": _trainable_state(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": torch.get_rng_state(),
        },
        buf,
    )
    atomic_write_bytes(state_dir / STATE_FILE, buf.getvalue())


def _load_state(state_dir, key, model, optimizer, scheduler) -> tuple[int, list[float], int, float]:
    path = state_dir / STATE_FILE
    if not path.is_file():
        return 0, [], 0, 0.0
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("key") != key:
        return 0, [], 0, 0.0  # a different run: start fresh (the old state is overwritten at the first save)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            named[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return state["step"], list(state["losses"]), state["tokens"], state["seconds"]
