"""fedge quantization: base-weight backends, update codecs and export."""
