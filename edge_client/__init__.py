"""fedge edge client: device-side model loading, data, local training and CLI."""
