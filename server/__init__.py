"""fedge server: aggregation, strategies and round state (importable without torch)."""
