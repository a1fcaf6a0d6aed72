"""A tuned adapter on the device: merged and exported for ONNX Runtime, llama.cpp (GGUF) or transformers, and run
on each of them through one small interface."""
