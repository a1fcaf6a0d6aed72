"""The device side: everything that runs on an edge device, in rooms by capability.

Bottom to top (a room imports only rooms below it; pyproject.toml's import contracts check it):

- `training` and `planning`: local data, the training loop and evaluation; the round's training plan and its cost
  models (pure arithmetic on a model's shape);
- `device`: what this device is and can do: inventory, profiling, power and energy meters, emulated devices;
- `agent`: the background agent: run conditions, the hold files it talks through, its service units;
- `federation` and `export`: the Flower ClientApp and what runs it on a device (`fedge client start`, the warm
  worker, the ClientApp launcher, a round's local work); merging and exporting a tuned adapter, and running it.
"""
