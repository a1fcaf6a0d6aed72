"""The device: its inventory (CPU, memory, accelerators, power), profiling, power and energy meters, and emulated
devices (a slower CPU, a memory cap, a link) for simulations and tests."""
