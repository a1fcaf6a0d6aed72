"""A merged transformers model of the Llama family as one GGUF file for llama.cpp, written with gguf-py.

What llama.cpp's own ``convert_hf_to_gguf.py`` does for these models, without its repository: the hyperparameters
under ``llama.*``, the byte-level BPE vocabulary (tokens, types, merges, special ids, chat template), and the
tensors under GGUF's names (gguf-py's `TensorNameMap`), with q and k rows permuted into the rotary layout llama.cpp
expects. Weights are F32, or Q8_0 / Q4_0 blocks (gguf-py's reference quantizers) for ``int8`` / ``int4``; norms stay
F32. Other architectures are refused by name: their conversion needs llama.cpp's converter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from fedge.common.errors import FedgeError

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
QUANT_TYPES = {"none": "F32", "int8": "Q8_0", "int4": "Q4_0"}


def write_gguf(merged: Path, out: Path, quantize: str = "none") -> Path:
    """Write ``out`` (a .gguf file) from the merged model directory ``merged``."""
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(merged)
    arch = (config.architectures or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise FedgeError(
            f"--format gguf: fedge writes GGUF for {', '.join(ARCHITECTURES)}, not {arch}; use --format onnx or "
            "hf (llama.cpp's convert_hf_to_gguf.py converts an hf export)"
        )
    rope = _rope(config)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    qtype = getattr(gguf.GGMLQuantizationType, QUANT_TYPES[quantize])
    file_type = {"none": gguf.LlamaFileType.ALL_F32, "int8": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "int4": gguf.LlamaFileType.MOSTLY_Q4_0}[quantize]  # fmt: skip

    tmp = out.with_name(f".{out.name}.tmp")  # written beside, renamed when complete
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(Path(merged).name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(rope)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    _add_vocab(writer, merged, config.vocab_size)

    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads the output projection from token_embd when output.weight is absent
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise FedgeError(f"--format gguf: no GGUF name for tensor {hf_name} of {arch}")
        data = tensor.numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, heads)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, kv_heads)
        _add_tensor(writer, name, data, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    return out


def _rope(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    kind = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    if kind not in ("default", None):
        raise FedgeError(f"--format gguf: RoPE scaling {kind!r} is not written by fedge's GGUF export; use onnx or hf")
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta or getattr(config, "rope_theta", None) or 10000.0)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """transformers' rotate-half rows to llama.cpp's interleaved pairs (what convert_hf_to_gguf.py's permute does)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_tensor(writer, name: str, data: np.ndarray, qtype) -> None:
    import gguf

    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32 and data.shape[-1] % block == 0:
        writer.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), qtype), raw_dtype=qtype)
    else:
        writer.add_tensor(name, data.astype(np.float32))


def _add_vocab(writer, merged: Path, vocab_size: int) -> None:
    """The byte-level BPE vocabulary of tokenizer.json: tokens by id (gaps padded), their types, merges, special
    token ids and the chat template."""
    import gguf

    spec = json.loads((Path(merged) / "tokenizer.json").read_text())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise FedgeError(f"--format gguf: fedge writes byte-level BPE vocabularies, not {model.get('type')}")
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(merged, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer)


def _pre_tokenizer(spec: dict) -> str:
    """llama.cpp's name for the pre-tokenization: SmolLM's (digits one by one, then byte-level) or the default."""
    pre = json.dumps(spec.get("pre_tokenizer") or {})
    return "smollm" if '"Digits"' in pre and '"individual_digits": true' in pre else "default"
