"""The device in a federation: the Flower ClientApp, a round's local work, and what runs them (`fedge client
start`'s SuperNode supervisor, the warm worker, the ClientApp launcher, machine-wide turns, the LoRA A store)."""
