"""The training plan: what a round's work can be on this device (precision, rank, layers, rows, steps), from cost
models of a model's shape. Pure functions; no torch."""
