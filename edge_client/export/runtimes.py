"""Running a model on the device: one small interface over PyTorch, ONNX Runtime (GenAI) and llama.cpp.

`open_runtime` picks the runtime from what a path holds: an ONNX export (``genai_config.json``) runs on ONNX Runtime
GenAI, a ``.gguf`` file (or a directory with one) on llama.cpp's Python binding where it is installed, and a
transformers directory or a fedge adapter on PyTorch. Every runtime encodes prompts with the model's own
tokenizer and chat template (`encode_chat`), so the same example becomes the same token ids everywhere, and
`score` computes exact match with one greedy loop for all of them: numbers across formats compare.

``python -m fedge.edge_client.export.runtimes MODEL --json`` measures one runtime in its own process (first-token
latency, decode tokens/s at batch 1, peak RSS, joules per token): what ``fedge profile --inference`` runs per runtime.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedge.common.errors import FedgeError


@dataclass(frozen=True)
class Sampling:
    """Sampled decoding; greedy when absent."""

    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise FedgeError(f"--temperature {self.temperature}: expected a number > 0")
        if not 0 < self.top_p <= 1:
            raise FedgeError(f"--top-p {self.top_p}: expected a number in (0, 1]")


class Runtime:
    """What every runtime offers. ``name``: e.g. ``torch_fp32``, ``ort``, ``llama_cpp``."""

    name = "?"
    tokenizer = None  # a transformers tokenizer: chat template, encode, decode
    eos: frozenset[int] = frozenset()

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        from fedge.edge_client.training.data import prompt_text

        return self.tokenizer(prompt_text(self.tokenizer, messages), add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def generate(self, ids: list[int], max_new_tokens: int, sampling: Sampling | None = None,
                 stop_at_eos: bool = True) -> list[int]:  # fmt: skip
        """New token ids after ``ids`` (at most ``max_new_tokens``; the end token is not returned)."""
        raise NotImplementedError

    def last_logits(self, ids: list[int]) -> np.ndarray:
        """The next-token logits after ``ids`` (float32, vocab-sized)."""
        raise NotImplementedError

    def timed(self, ids: list[int], new_tokens: int) -> tuple[float, float]:
        """(seconds to the first new token, seconds for the ``new_tokens - 1`` after it), end token ignored."""
        raise NotImplementedError


def _eos_ids(tokenizer, config_eos) -> frozenset[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    ids |= set(config_eos if isinstance(config_eos, list) else [config_eos] if config_eos is not None else [])
    return frozenset(i for i in ids if isinstance(i, int))


# --- PyTorch -----------------------------------------------------------------------------------------------------


class TorchRuntime(Runtime):
    """Eager PyTorch with a KV cache, one token per forward pass (the baseline every export is compared with)."""

    def __init__(self, model, tokenizer, dtype: str) -> None:
        import inspect

        self.model, self.tokenizer, self.name = model.eval(), tokenizer, f"torch_{dtype}"
        self.eos = _eos_ids(tokenizer, getattr(model.config, "eos_token_id", None))
        # transformers 5.2x calls the KV cache `cache`; earlier versions `past_key_values`
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @classmethod
    def load(cls, path: Path, dtype: str = "fp32", cache_dir: Path | None = None) -> TorchRuntime:
        """A transformers directory, or a fedge adapter directory on its base (from the model cache)."""
        import torch
        from transformers import AutoModelForCausalLM

        from fedge.common.modeling import load_tokenizer

        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        path = Path(path)
        if (path / "adapter_config.json").is_file():
            from peft import PeftModel

            from fedge.common.adapters import read_meta
            from fedge.common.models import cached_model

            source = read_meta(path).get("model", {}).get("source")
            if not source or cache_dir is None:
                raise FedgeError(f"{path}: an adapter whose base model is unknown; export it with --model first")
            base = cached_model(source, cache_dir)
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype), path)
            return cls(model.merge_and_unload(), load_tokenizer(base), dtype)
        return cls(AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype), load_tokenizer(path), dtype)

    @classmethod
    def load_gguf(cls, path: Path) -> TorchRuntime:
        """A GGUF file read back by transformers' GGUF loader (dequantized to fp32, q and k rows un-permuted): how
        fedge checks a GGUF export where llama.cpp's binding is not installed. Named ``torch_gguf``."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        path = Path(path)
        hf_logging.disable_progress_bar()  # its de-quantizing bar is library noise on the console
        try:
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as err:  # transformers raises many types for unreadable GGUF files
            raise FedgeError(f"{path}: cannot read it as a GGUF model ({type(err).__name__}: {err})") from None
        runtime = cls(model, tokenizer, "fp32")
        runtime.name = "torch_gguf"
        return runtime

    def _step(self, ids, past):
        import torch

        with torch.inference_mode():
            out = self.model(
                torch.tensor([ids]), use_cache=True, **({self._cache_arg: past} if past is not None else {})
            )
        cache = getattr(out, "cache", None)
        return out.logits[0, -1].float(), cache if cache is not None else out.past_key_values

    def last_logits(self, ids: list[int]) -> np.ndarray:
        return self._step(ids, None)[0].numpy()

    def generate(self, ids, max_new_tokens, sampling=None, stop_at_eos=True):
        import torch

        rng = torch.Generator().manual_seed(sampling.seed) if sampling else None
        logits, past = self._step(ids, None)
        out: list[int] = []
        while len(out) < max_new_tokens:
            token = _torch_pick(logits, sampling, rng)
            if stop_at_eos and token in self.eos:
                break
            out.append(token)
            if len(out) < max_new_tokens:
                logits, past = self._step([token], past)
        return out

    def timed(self, ids, new_tokens):
        t0 = time.perf_counter()
        logits, past = self._step(ids, None)
        token = int(logits.argmax())
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            logits, past = self._step([token], past)
            token = int(logits.argmax())
        return t1 - t0, time.perf_counter() - t1


def _torch_pick(logits, sampling: Sampling | None, rng) -> int:
    import torch

    if sampling is None:
        return int(logits.argmax())
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(0) - sorted_p < sampling.top_p  # the smallest set whose mass reaches top_p
    sorted_p = sorted_p * keep
    return int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=rng)])


# --- ONNX Runtime GenAI ------------------------------------------------------------------------------------------


class OrtRuntime(Runtime):
    """An ONNX export on ONNX Runtime GenAI (its KV cache and decoding loop in C++), CPU execution provider."""

    name = "ort"

    def __init__(self, path: Path) -> None:
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise FedgeError(f"{path}: an ONNX export needs onnxruntime-genai: pip install 'fedge[export]'") from None
        from fedge.common.modeling import load_tokenizer

        self.og, self.path = og, Path(path)
        try:
            self.model = og.Model(str(path))
        except Exception as err:  # onnxruntime-genai raises its own RuntimeError subclasses for bad files
            raise FedgeError(f"{path}: ONNX Runtime GenAI cannot load it ({err})") from None
        self.tokenizer = load_tokenizer(path)
        config = json.loads((self.path / "genai_config.json").read_text())
        self.eos = _eos_ids(self.tokenizer, config.get("model", {}).get("eos_token_id"))
        self.context = int(config.get("model", {}).get("context_length") or 2048)

    def _generator(self, ids: list[int], max_new: int, sampling: Sampling | None, force: bool = False):
        params = self.og.GeneratorParams(self.model)
        options = {"max_length": min(self.context, len(ids) + max_new), "do_sample": sampling is not None}
        if sampling is not None:
            options.update(temperature=sampling.temperature, top_p=sampling.top_p, random_seed=sampling.seed)
        if force:
            options["min_length"] = options["max_length"]
        params.set_search_options(**options)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(ids)
        return generator

    def last_logits(self, ids):
        generator = self._generator(ids, 1, None)
        return np.asarray(generator.get_logits(), dtype=np.float32).reshape(-1)

    def generate(self, ids, max_new_tokens, sampling=None, stop_at_eos=True):
        generator = self._generator(ids, max_new_tokens, sampling, force=not stop_at_eos)
        out: list[int] = []
        while len(out) < max_new_tokens and not generator.is_done():
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if stop_at_eos and token in self.eos:
                break
            out.append(token)
        return out

    def timed(self, ids, new_tokens):
        t0 = time.perf_counter()
        generator = self._generator(ids, new_tokens, None, force=True)
        generator.generate_next_token()
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            generator.generate_next_token()
        return t1 - t0, time.perf_counter() - t1


# --- llama.cpp ---------------------------------------------------------------------------------------------------


class LlamaCppRuntime(Runtime):
    """A GGUF file on llama.cpp (``pip install llama-cpp-python``: what a Raspberry Pi already runs)."""

    name = "llama_cpp"

    def __init__(self, path: Path) -> None:
        try:
            from llama_cpp import Llama
        except ImportError:
            raise FedgeError(f"{path}: a GGUF model runs on llama.cpp: pip install llama-cpp-python") from None
        from transformers import AutoTokenizer

        path = Path(path)
        try:
            self.llm = Llama(model_path=str(path), n_ctx=2048, logits_all=False, verbose=False)
            # the GGUF's own vocabulary and chat template, as transformers reads them: the same ids as PyTorch
            self.tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as err:  # llama.cpp raises ValueError, transformers several types, for unreadable files
            raise FedgeError(f"{path}: llama.cpp cannot load it ({type(err).__name__}: {err})") from None
        self.eos = frozenset({self.llm.token_eos()})

    def last_logits(self, ids):
        self.llm.reset()
        self.llm.eval(ids)
        # the binding keeps only sampled tokens unless every row's logits are kept (logits_all: n_ctx x vocab floats);
        # the context's own buffer holds the last row
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),)).astype(np.float32)

    def generate(self, ids, max_new_tokens, sampling=None, stop_at_eos=True):
        kwargs = {"temp": 0.0} if sampling is None else {"temp": sampling.temperature, "top_p": sampling.top_p}
        if sampling is not None:
            self.llm.set_seed(sampling.seed)
        self.llm.reset()
        out: list[int] = []
        for token in self.llm.generate(ids, reset=True, **kwargs):
            if (stop_at_eos and token in self.eos) or len(out) >= max_new_tokens:
                break
            out.append(int(token))
        return out

    def timed(self, ids, new_tokens):
        self.llm.reset()  # else the binding reuses the KV cache of a matching prompt prefix: no prompt work timed
        t0 = time.perf_counter()
        t1, n = None, 0
        for _ in self.llm.generate(ids, reset=True, temp=0.0):
            n += 1
            if t1 is None:
                t1 = time.perf_counter()
            if n >= new_tokens:
                break
        return t1 - t0, time.perf_counter() - t1


# --- choosing one -------------------------------------------------------------------------------------------------


def open_runtime_kind(path: Path) -> str | None:
    """Which runtime runs what ``path`` holds: "ort", "gguf", "torch", or None (nothing fedge can run)."""
    path = Path(path)
    if path.is_dir() and (path / "genai_config.json").is_file():
        return "ort"
    if (path.is_dir() and any(path.glob("*.gguf"))) or (path.is_file() and path.suffix == ".gguf"):
        return "gguf"
    if path.is_dir() and ((path / "adapter_config.json").is_file() or (path / "config.json").is_file()):
        return "torch"
    return None


def open_runtime(path: Path, cache_dir: Path | None = None, dtype: str = "fp32") -> Runtime:
    """The runtime for what ``path`` holds (see the module docstring); a clear error for anything else."""
    import importlib.util

    path, kind = Path(path), open_runtime_kind(path)
    if kind == "ort":
        return OrtRuntime(path)
    if kind == "gguf":
        gguf = sorted(path.glob("*.gguf"))[0] if path.is_dir() else path
        if importlib.util.find_spec("llama_cpp") is not None:
            return LlamaCppRuntime(gguf)
        return TorchRuntime.load_gguf(gguf)
    if kind == "torch":
        return TorchRuntime.load(path, dtype, cache_dir)
    raise FedgeError(
        f"{path}: not a model fedge can run (expected an export from `fedge export`, a transformers directory, "
        "a fedge adapter or a .gguf file)"
    )


def score(runtime: Runtime, examples: Sequence, max_new_tokens: int | None = None) -> float:
    """Exact match of greedy replies, one example at a time (the same loop on every runtime)."""
    from fedge.edge_client.training.evaluate import answer_token_limit, exact_match

    limit = max_new_tokens or answer_token_limit(runtime.tokenizer, examples)
    replies = [runtime.decode(runtime.generate(runtime.encode_chat(ex.prompt), limit)) for ex in examples]
    return exact_match(replies, examples)


# --- measuring one runtime (its own process: peak RSS is the runtime's) -------------------------------------------

BENCH_PROMPT = "Explain in a few sentences why the sky is blue, for a curious ten-year-old."


def bench(path: Path, cache_dir: Path | None, dtype: str, new_tokens: int, reps: int) -> dict:
    """First-token latency, decode tokens/s at batch 1 (``new_tokens`` forced past the end token), peak RSS and
    joules per decoded token of one runtime; medians of ``reps`` runs after one warm-up."""
    from fedge.edge_client.device.energy import EnergySession

    t0 = time.perf_counter()
    runtime = open_runtime(path, cache_dir, dtype)
    load_s = time.perf_counter() - t0
    ids = runtime.encode_chat([{"role": "user", "content": BENCH_PROMPT}])
    runtime.timed(ids, 4)
    first, decode = [], []
    with EnergySession(interval_s=0.5) as meter, meter.phase("decode"):
        for _ in range(reps):
            f, d = runtime.timed(ids, new_tokens)
            first.append(f)
            decode.append((new_tokens - 1) / d)
    phase = meter.result.phases["decode"]
    return {
        "runtime": runtime.name,
        "model": str(path),
        "load_s": round(load_s, 2),
        "prompt_tokens": len(ids),
        "new_tokens": new_tokens,
        "first_token_ms": round(statistics.median(first) * 1000, 1),
        "decode_tokens_per_s": round(statistics.median(decode), 2),
        "decode_tokens_per_s_all": [round(v, 2) for v in decode],
        "peak_rss_mb": peak_rss_mb(),
        "j_per_token": round(phase.joules / (reps * new_tokens), 4),
        "energy_method": meter.result.method,
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM where Linux has it (``ru_maxrss`` survives exec, so a process
    started from a large parent would report the parent's peak), else ``ru_maxrss``."""
    import resource
    import sys

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    scale = 2**20 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale, 1)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m fedge.edge_client.export.runtimes", description=bench.__doc__)
    p.add_argument("model", type=Path)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="PyTorch's weights")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cache-dir", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        print(json.dumps(bench(args.model, args.cache_dir, args.dtype, args.new_tokens, args.reps)))
    except FedgeError as err:
        print(json.dumps({"error": str(err)}))
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
