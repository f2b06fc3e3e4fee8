"""Sharding: fused sparse optimizers, planning, DistributedModelParallel, loading the frozen SCL table."""
