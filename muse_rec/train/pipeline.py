"""The train pipeline each model's lookups allow.

TorchRec's `TrainPipelineSparseDist` traces the model once and runs each sharded collection's
input all-to-all for the next batch during this step: that needs every sharded call's IDs to come
from the batch, one call per collection. sim_soft and lemur look their sequence collection up at
the positions their forward chose (`MuseModel.kept_inputs`; sim_soft after a first lookup to
score), so they train under TorchRec's base pipeline: the same forward, backward and fused
optimizer step, without running the lookups ahead.
"""
from __future__ import annotations

import torch
from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist
from torchrec.distributed.train_pipeline.train_pipelines import TrainPipeline

from muse_rec.config import ModelConfig


class EagerPipeline(TrainPipelineBase):
    """`TrainPipelineBase` (on CUDA the next batch's copy to the device still overlaps the step)
    with SparseDist's `detach`, so callers treat both alike: it never rewrote the model."""

    def detach(self) -> torch.nn.Module:
        return self._model


def looks_up_in_forward(config: ModelConfig) -> bool:
    """Whether the model chooses some of its sharded lookups' IDs in its forward: sim_soft (after
    scoring) and lemur (from its representations), which look up the kept positions alone."""
    return config.method in ("sim_soft", "lemur")


def train_pipeline(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, config: ModelConfig) -> TrainPipeline:
    """The pipeline `muse-rec train` steps `model` (DMP) with; every batch of the iterator is trained on."""
    if looks_up_in_forward(config):
        return EagerPipeline(model, optimizer, device)
    return TrainPipelineSparseDist(model, optimizer, device, execute_all_batches=True)
