"""Training: the loop, checkpoints, metrics and launching."""
