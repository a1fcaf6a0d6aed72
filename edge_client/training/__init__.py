"""Local training: data files into examples, batches, the training loop (lean loss, resumable), evaluation."""
