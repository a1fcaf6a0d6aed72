"""A loaded model for both sides: the base model (possibly quantized), its tokenizer and a LoRA adapter.

The device trains and evaluates on it; the server uses it only to draw the federation's first adapter and to
write the final one as a PEFT directory. :class:`ModelHolder` owns what is loaded, so nothing is kept in
module globals: a process that wants the model to survive between rounds (the warm worker, a simulated client)
keeps its holder. torch, transformers and peft are imported inside the functions that need them, so the
server imports this module without torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedge.common.errors import FedgeError, ModelError
from fedge.common.models import model_info, pull_model

if TYPE_CHECKING:
    import torch

Arrays = dict[str, np.ndarray]


@dataclass
class LoraSettings:
    """Which LoRA adapter to train. ``top_layers`` trains only the last N decoder layers (None: all)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    top_layers: int | None = None
    freeze_a: bool = False  # train B only; A stays at its seeded init (FFA-LoRA: makes FedAvg of adapters exact)

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("lora.target_modules must name at least one module, e.g. q_proj")
        if self.top_layers is not None and self.top_layers < 1:
            raise ValueError(f"lora.top_layers must be >= 1 or None, got {self.top_layers}")


@dataclass
class ModelSession:
    """A loaded base model (possibly quantized), its tokenizer, and where they came from."""

    model: torch.nn.Module
    tokenizer: Any
    model_dir: Path
    source: str
    precision: str
    device: torch.device

    def describe(self) -> dict:
        return {
            **model_info(self.model_dir),
            "source": self.source,
            "precision": self.precision,
            "device": str(self.device),
        }


def open_model(
    source: str,
    cache_dir: Path,
    precision: str = "auto",
    device: str = "auto",
    say: Callable[[str], None] = lambda _: None,
    compute_dtype: torch.dtype | None = None,
) -> ModelSession:
    """Pull (once) and load a base model with frozen, possibly quantized weights, and its tokenizer."""
    from fedge.quantization.backends import BackendUnavailable, load_base_model, pick_device

    model_dir = pull_model(source, cache_dir, say)
    try:
        dev = pick_device(device)
    except ValueError as err:
        raise FedgeError(f"--device {device}: {err}") from None
    say(f"loading {source} ({precision}) on {dev}")
    try:
        loaded = load_base_model(model_dir, precision, dev, compute_dtype=compute_dtype)
    except BackendUnavailable as err:
        raise FedgeError(str(err)) from None
    except (OSError, ValueError) as err:
        raise ModelError(f"{model_dir}: cannot load the model ({err})") from None
    return ModelSession(loaded.model, load_tokenizer(model_dir), model_dir, source, loaded.precision, dev)


def load_tokenizer(model_dir: Path) -> Any:
    """The model directory's tokenizer, with a pad token (the EOS token where the model has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def add_lora(model: torch.nn.Module, lora: LoraSettings, seed: int = 0) -> torch.nn.Module:
    """Wrap a frozen base model with a fresh LoRA adapter (peft), adapter weights in fp32.

    The adapter's random init (lora_A) is drawn from ``seed``, so the same seed gives the same run.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    layers = None
    if lora.top_layers is not None:
        n = model.config.num_hidden_layers
        layers = list(range(max(0, n - lora.top_layers), n))
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:
        raise ValueError(f"lora.target_modules {list(lora.target_modules)} do not fit this model: {err}") from None
    if lora.freeze_a:
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return peft_model


def set_adapter(model: torch.nn.Module, arrays: Arrays) -> None:
    """Load adapter arrays (PEFT state-dict names) into a peft model; ValueError if they do not fit it."""
    import torch
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, {k: torch.from_numpy(v) for k, v in arrays.items()})
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"the global adapter does not fit this model: missing {missing[:3]}, "
            f"unexpected {list(result.unexpected_keys)[:3]}"
        )


def get_adapter(model: torch.nn.Module) -> Arrays:
    """The adapter's tensors as float32 numpy copies (never views of the live parameters, which train on)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().cpu().numpy().copy() for k, v in get_peft_model_state_dict(model).items()}


class ModelHolder:
    """Owns at most one loaded base model (a device has no memory for two) and the LoRA wrapper on it.

    A request for the same model, precision and compute dtype reuses the loaded base; one for another LoRA
    shape swaps the LoRA layers and keeps the base weights. ``threads`` > 0 sets torch's thread count on the
    first load. ``seq_lens`` keeps, per data fingerprint, the data's row length for this holder's tokenizer
    (worked out once: tokenizing all the data every round would count against a round's deadline).
    """

    def __init__(self, cache_dir: Path, precision: str = "auto", threads: int = 0, device: str = "auto") -> None:
        self.cache_dir, self.precision, self.threads, self.device = Path(cache_dir), precision, threads, device
        self.session: ModelSession | None = None
        self.model: Any = None  # the peft-wrapped model of the current LoRA shape (None: not wrapped yet)
        self.seq_lens: dict[tuple, int] = {}
        self._base_key: tuple | None = None
        self._lora_key: tuple | None = None
        self._tokenizers: dict[str, Any] = {}

    def base(self, model: str, precision: str | None = None, compute_dtype: str | None = None) -> ModelSession:
        """The loaded base model ``model``; loaded now unless the one held matches.

        ``precision=None`` (evaluation) takes whatever precision the held model of that name has, else the
        holder's default. ``compute_dtype``: "bf16" or "fp32" for quantized weights (None: the backend's choice).
        """
        import torch

        if precision is None and self.session is not None and self._base_key and self._base_key[0] == model:
            return self.session
        key = (model, precision or self.precision, compute_dtype)
        if self._base_key != key:
            self.unload()
            if self.threads > 0:
                torch.set_num_threads(self.threads)
            dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(compute_dtype or "")
            self.session = open_model(model, self.cache_dir, key[1], self.device, compute_dtype=dtype)
            self._base_key = key
        assert self.session is not None
        return self.session

    def adapter(
        self, model: str, lora: LoraSettings, seed: int, precision: str | None = None, compute_dtype: str | None = None
    ) -> tuple[ModelSession, Any]:
        """(session, peft model) with a LoRA adapter of ``lora``'s shape drawn from ``seed``, reusing the loaded
        base and, when the shape and seed are the same, the LoRA layers (holding whatever was set or trained)."""
        session = self.base(model, precision, compute_dtype)
        key = (lora.r, lora.alpha, lora.target_modules, lora.top_layers, lora.freeze_a, seed)
        if self._lora_key != key:
            if self.model is not None:
                session.model = self.model.unload()  # drop the old LoRA layers, keep the base weights
            self.model, self._lora_key = add_lora(session.model, lora, seed=seed), key
        return session, self.model

    def initial_adapter(self, model: str, lora: LoraSettings, seed: int) -> Arrays:
        """A federation's starting adapter: LoRA A drawn from ``seed``, B zero, so it is the base model.

        Always drawn afresh: the held LoRA layers may have trained or been set since they were drawn.
        """
        self._lora_key = None
        _, peft_model = self.adapter(model, lora, seed)
        return get_adapter(peft_model)

    def tokenizer(self, model: str) -> Any:
        """The tokenizer of ``model`` (loaded once, without the model's weights)."""
        if model not in self._tokenizers:
            self._tokenizers[model] = load_tokenizer(pull_model(model, self.cache_dir))
        return self._tokenizers[model]

    def unload(self) -> None:
        """Let go of the loaded model (its memory returns once nothing else refers to it)."""
        self.session, self.model, self._base_key, self._lora_key = None, None, None, None
