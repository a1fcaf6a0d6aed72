"""What both sides share: the wire protocol and its keys, settings defined once, LoRA factor math, the model cache
and the model holder, adapters on disk, crash-safe files, processes, errors. Imports neither side.

It lives in quantization/, the folder both sides already stand on, and is installed as ``fedge.common``
(docs/architecture.md says why)."""

if __name__ != "fedge.common":  # an editable install also reaches this folder as fedge.quantization.common
    raise ImportError(f"import fedge.common, not {__name__}: this folder is installed as fedge.common")
