"""The dense model: GSU selection, ESU modules and the Dice tower, as plain PyTorch."""
