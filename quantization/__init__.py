"""fedge quantization: base-weight backends, update codecs and what a client sends with them (updates.py).

Imports nothing of fedge beyond itself, and nothing heavy here: ``backends`` and ``portable`` need torch,
``codecs`` and ``updates`` only numpy (the server decodes updates without torch).
"""

# The base-weight precisions `backends.load_base_model` takes, named here so that settings and CLI flags can
# offer them without importing torch.
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8", "int4", "bnb-int8", "bnb-nf4")
