"""Training and evaluation: the loop, metrics and checkpoints."""
