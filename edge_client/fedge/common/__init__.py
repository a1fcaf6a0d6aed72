"""What the device side and the server side share; imports neither of them (checked by tests/test_layers.py)."""
