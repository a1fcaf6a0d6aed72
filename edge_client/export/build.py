"""``fedge export``: a tuned adapter merged into its base, as files a device runs without fedge's training stack.

- ``hf``: a plain transformers directory (merged weights, tokenizer, chat template);
- ``onnx``: a decoder with a KV cache for ONNX Runtime, built by ONNX Runtime GenAI's model builder from the
  merged directory (``--quantize int8|int4``: weight-only MatMulNBits quantization, onnxruntime's quantizer; for
  int8 fedge quantizes the embedding table too, per row, which the builder does only for int4);
- ``gguf``: one GGUF file llama.cpp loads (:mod:`fedge.edge_client.export.gguf_export`; f32, Q8_0 or Q4_0).

The merge loads the base in fp32 from the model cache (fedge quantizes the base when it loads it for training, so
the cache holds float weights: nothing to dequantize) and folds the LoRA product into it (PEFT's
``merge_and_unload``). Before an export is declared done it is checked against the merged PyTorch model
(`check_parity`: last-token logits on a few prompts, and their greedy answers) and, with ``--eval-data``, scored by
exact match the same way for both (:mod:`fedge.edge_client.export.runtimes`). The manifest ``fedge_export.json`` records
the base, the adapter's fingerprint, the format, the sizes and those figures. The directory appears complete or not
at all: it is built beside ``--out`` and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedge.common.errors import FedgeError

log = logging.getLogger(__name__)
FORMATS = ("hf", "onnx", "gguf")
QUANTIZE = ("none", "int8", "int4")
MANIFEST = "fedge_export.json"
PARITY_PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three colours.",
    "Translate 'good morning' into Spanish.",
)
# Max |logit difference| an fp32 export may show against the merged model. Measured on SmolLM2-135M: ONNX Runtime
# 9e-5; llama.cpp 0.014 (its KV cache is f16). A broken conversion (a wrong q/k permutation, a missing tensor)
# differs by whole units.
FP32_LOGIT_TOLERANCE = 0.05


@dataclass
class ExportRequest:
    adapter: Path
    format: str
    out: Path
    quantize: str = "none"
    model: str | None = None  # the base, if not the one the adapter names
    eval_data: str | None = None
    eval_examples: int = 200

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise FedgeError(f"--format {self.format}: expected one of {', '.join(FORMATS)}")
        if self.quantize not in QUANTIZE:
            raise FedgeError(f"--quantize {self.quantize}: expected one of {', '.join(QUANTIZE)}")
        if self.format == "hf" and self.quantize != "none":
            raise FedgeError("--format hf writes float weights: --quantize needs --format onnx or gguf")
        if self.eval_examples < 1:
            raise FedgeError(f"--eval-examples {self.eval_examples}: expected a number >= 1")


def export(req: ExportRequest, cache_dir: Path, say: Callable[[str], None] = print) -> dict:
    """Write the export to ``req.out`` (atomically) and return its manifest."""
    from fedge.common.adapters import check_writable, read_meta
    from fedge.common.fsutil import publish_dir
    from fedge.common.models import cached_model

    adapter = Path(req.adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise FedgeError(f"--adapter {adapter}: not an adapter directory (no adapter_config.json)")
    source = req.model or read_meta(adapter).get("model", {}).get("source")
    if not source:
        raise FedgeError(f"--adapter {adapter}: its fedge_adapter.json names no base model; give --model")
    base = cached_model(source, cache_dir)
    check_writable(req.out)
    if req.eval_data:
        from fedge.edge_client.training.data import load_examples

        load_examples(req.eval_data)  # a bad data file is refused now, not after minutes of merging and building
    started = time.monotonic()
    parent = req.out.resolve().parent
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{req.out.name}-"))
    work = Path(tempfile.mkdtemp(dir=parent, prefix=f".{req.out.name}-work-"))
    try:
        say(f"merging {adapter} into {source}")
        merged = merge_adapter(adapter, base, work / "merged")
        say(f"writing {req.format}" + (f" ({req.quantize})" if req.quantize != "none" else ""))
        files = _write(req, merged, staging, work)
        say("checking the export against the merged model")
        parity = check_parity(merged, staging, req.format, req.quantize, cache_dir)
        scores = _exact_match(req, merged, staging, cache_dir, say) if req.eval_data else None
        manifest = _manifest(req, source, adapter, files, parity, scores, time.monotonic() - started)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        publish_dir(staging, req.out)
    except OSError as err:
        raise FedgeError(f"--out {req.out}: could not write the export ({err.strerror or err})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return manifest


def merge_adapter(adapter: Path, base: Path, out: Path) -> Path:
    """The base with the adapter's LoRA product folded into its weights, saved as a transformers directory."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    try:
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    except (ValueError, KeyError, RuntimeError) as err:
        raise FedgeError(f"--adapter {adapter}: does not fit the base model {base} ({err})") from None
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    for name in ("chat_template.jinja", "generation_config.json"):
        if (base / name).is_file() and not (out / name).is_file():
            shutil.copy2(base / name, out / name)
    return out


def _write(req: ExportRequest, merged: Path, staging: Path, work: Path) -> dict[str, int]:
    if req.format == "hf":
        shutil.copytree(merged, staging, dirs_exist_ok=True)
    elif req.format == "onnx":
        build_onnx(merged, staging, req.quantize, work / "onnx-cache")
    else:
        from fedge.edge_client.export.gguf_export import write_gguf

        write_gguf(merged, staging / f"{req.out.name}.gguf", req.quantize)
    return {p.name: p.stat().st_size for p in sorted(staging.iterdir()) if p.is_file()}


# --- ONNX ------------------------------------------------------------------------------------------------------

BUILDER_PRECISION = {"none": "fp32", "int8": "int8", "int4": "int4"}


def build_onnx(merged: Path, out: Path, quantize: str, cache: Path) -> None:
    """ONNX Runtime GenAI's model builder on the merged directory: model.onnx (+ .data), genai_config.json and the
    tokenizer files. An architecture the builder does not know is refused with its name.

    The builder runs in its own process, away from this checkout's directories: it imports a top-level module
    named ``quantization`` of its own, which fedge's ``quantization/`` folder would shadow."""
    import importlib.util
    import subprocess
    import sys

    from transformers import AutoConfig

    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise FedgeError("--format onnx needs onnxruntime-genai: pip install 'fedge[export]'")
    arch = (AutoConfig.from_pretrained(merged).architectures or ["?"])[0]
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(merged), "-o", str(out),
           "-p", BUILDER_PRECISION[quantize], "-e", "cpu", "-c", str(cache)]  # fmt: skip
    if quantize == "int4":
        cmd += ["--extra_options", "op_types_to_quantize=MatMul/Gather"]  # the embedding table in 4 bits too
    cache.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(cmd, cwd=cache, env=env, capture_output=True, text=True)
    log.debug("model builder output:\n%s", (done.stdout + done.stderr)[-20000:])
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise FedgeError(f"--format onnx: ONNX Runtime GenAI's model builder cannot export {arch} ({last})")
    if quantize == "int8":
        _quantize_embeddings(out)
    for path in out.iterdir():
        path.chmod(0o644)  # the quantizer writes its data file owner-only


EMBEDDING_GROUP = 32  # values per scale and offset in the 8-bit embedding table, as the builder's MatMul blocks


def _quantize_embeddings(out: Path) -> None:
    """The embedding table in 8 bits too, a scale and offset per group of `EMBEDDING_GROUP` values of a row (the
    builder quantizes a Gather only to 4 bits, and onnxruntime's dynamic quantization keeps one scale for the whole
    table, which cost 4.5 points of exact match on the demo). One scale per row was not enough either: on SmolLM2
    its error (1.1% of the table's RMS, twice a group's) turned the tuned model's answer to "What is the capital of
    France?" into a loop. Gather(codes) -> Cast -> x Gather(scales) + Gather(offsets) -> Reshape, standard ONNX
    operators; the table grows by 25% over one byte a value (28 + 7 MB for SmolLM2's 49152 x 576)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(out / "model.onnx")  # with its external data
    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    for node in [n for n in graph.node if n.op_type == "Gather" and n.input[0] in weights]:
        table = numpy_helper.to_array(weights[node.input[0]])
        if table.ndim != 2 or table.dtype != np.float32:
            continue
        vocab, hidden = table.shape
        group = EMBEDDING_GROUP if hidden % EMBEDDING_GROUP == 0 else hidden
        grouped = table.reshape(vocab, hidden // group, group)  # (vocab, groups, group)
        low, high = grouped.min(axis=2, keepdims=True), grouped.max(axis=2, keepdims=True)  # (vocab, groups, 1)
        scale = np.where(high > low, (high - low) / 255.0, 1.0).astype(np.float32)
        codes = np.clip(np.round((grouped - low) / scale), 0, 255).astype(np.uint8)
        name, ids, result = node.input[0], node.input[1], node.output[0]
        graph.initializer.remove(weights[name])
        graph.initializer.extend(
            [
                numpy_helper.from_array(codes, f"{name}.q8"),
                numpy_helper.from_array(scale, f"{name}.q8_scale"),
                numpy_helper.from_array(low.astype(np.float32), f"{name}.q8_offset"),
                numpy_helper.from_array(np.array([hidden], np.int64), f"{name}.q8_hidden"),
            ]
        )
        at = list(graph.node).index(node)
        graph.node.remove(node)
        r, n = result, node.name
        steps = [
            helper.make_node("Gather", [f"{name}.q8", ids], [f"{r}.q8"], name=f"{n}/codes"),  # (*ids, groups, group)
            helper.make_node("Cast", [f"{r}.q8"], [f"{r}.f"], to=TensorProto.FLOAT, name=f"{n}/cast"),
            helper.make_node("Gather", [f"{name}.q8_scale", ids], [f"{r}.s"], name=f"{n}/scales"),  # (*ids, groups, 1)
            helper.make_node("Gather", [f"{name}.q8_offset", ids], [f"{r}.o"], name=f"{n}/offsets"),
            helper.make_node("Mul", [f"{r}.f", f"{r}.s"], [f"{r}.fs"], name=f"{n}/scale"),
            helper.make_node("Add", [f"{r}.fs", f"{r}.o"], [f"{r}.g"], name=f"{n}/offset"),
            helper.make_node("Shape", [ids], [f"{r}.ids_shape"], name=f"{n}/ids_shape"),
            helper.make_node(
                "Concat", [f"{r}.ids_shape", f"{name}.q8_hidden"], [f"{r}.shape"], axis=0, name=f"{n}/shape"
            ),
            helper.make_node("Reshape", [f"{r}.g", f"{r}.shape"], [r], name=f"{n}/rows"),  # (*ids, hidden)
        ]
        for i, step in enumerate(steps):
            graph.node.insert(at + i, step)
    (out / "model.onnx.data").unlink()
    onnx.save(model, out / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data")  # fmt: skip


# --- checks ------------------------------------------------------------------------------------------------------


def check_parity(merged: Path, exported: Path, fmt: str, quantize: str, cache_dir: Path) -> dict:
    """The export against the merged PyTorch model on `PARITY_PROMPTS`: the largest last-token logit difference,
    how often the top token agrees, and how many greedy answers (24 tokens) are identical. An fp32 export whose
    logits differ by more than `FP32_LOGIT_TOLERANCE` is refused: something broke in the conversion."""
    import numpy as np

    from fedge.edge_client.export.runtimes import TorchRuntime, open_runtime

    reference, candidate = TorchRuntime.load(merged), open_runtime(exported, cache_dir)
    diffs, top, same = [], 0, 0
    for text in PARITY_PROMPTS:
        ids = reference.encode_chat([{"role": "user", "content": text}])
        a, b = reference.last_logits(ids), candidate.last_logits(ids)
        diffs.append(float(np.max(np.abs(a - b))))
        top += int(np.argmax(a) == np.argmax(b))
        same += int(reference.generate(ids, 24) == candidate.generate(ids, 24))
    figures = {"prompts": len(PARITY_PROMPTS), "max_abs_logit_diff": max(diffs), "top1_agree": top,
               "greedy_same": same, "runtime": candidate.name}  # fmt: skip
    if quantize == "none" and figures["max_abs_logit_diff"] > FP32_LOGIT_TOLERANCE:
        raise FedgeError(
            f"the {fmt} export's logits differ from the merged model's by {figures['max_abs_logit_diff']:.3g} "
            f"(> {FP32_LOGIT_TOLERANCE:g}): the conversion is broken; nothing was written"
        )
    return figures


def _exact_match(req: ExportRequest, merged: Path, exported: Path, cache_dir: Path, say) -> dict:
    from fedge.edge_client.export.runtimes import TorchRuntime, open_runtime, score
    from fedge.edge_client.training.data import load_examples

    examples = [ex for ex in load_examples(req.eval_data) if ex.text is None][: req.eval_examples]
    if not examples:
        raise FedgeError(f"--eval-data {req.eval_data}: no chat examples to score")
    say(f"exact match on {len(examples)} held-out examples: merged model, then the export")
    merged_em = score(TorchRuntime.load(merged), examples)
    export_em = score(open_runtime(exported, cache_dir), examples)
    return {"data": req.eval_data, "examples": len(examples), "merged": merged_em, "export": export_em}


# --- the manifest and the move into place -----------------------------------------------------------------------


def _manifest(req, source, adapter, files, parity, scores, seconds) -> dict:
    from fedge import __version__

    return {
        "format": req.format,
        "quantize": req.quantize,
        "base_model": source,
        "adapter": {"path": str(Path(adapter).resolve()), "sha256": adapter_fingerprint(adapter)},
        "files": files,
        "size_mb": round(sum(files.values()) / 1e6, 2),
        "parity": parity,
        "exact_match": scores,
        "seconds": round(seconds, 1),
        "fedge": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def adapter_fingerprint(adapter: Path) -> str:
    """SHA-256 over the adapter's weight and config files (names and bytes): which adapter an export holds."""
    digest = hashlib.sha256()
    for path in sorted(Path(adapter).iterdir()):
        if path.is_file() and path.name.startswith("adapter_"):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()
