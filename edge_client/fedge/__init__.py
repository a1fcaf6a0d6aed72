"""fedge: federated fine-tuning of quantized small LLMs on edge devices.

One import root over the folders the product is laid out in (see ``[tool.setuptools.package-dir]`` in
pyproject.toml): ``fedge.edge_client`` (the device side), ``fedge.server`` (the server side),
``fedge.quantization`` (base-weight backends and update codecs), ``fedge.common`` (what both sides share:
the wire protocol, settings, LoRA factor math, the model cache, files, processes, errors) and, on top of
them, the ``fedge`` command (``fedge.cli``) and the demo. Importing ``fedge`` loads nothing heavy.
"""

if __name__ != "fedge":  # an editable install also reaches this folder as fedge.edge_client.fedge
    raise ImportError(f"import fedge, not {__name__}: this folder is installed as fedge")

__version__ = "0.3.0"
