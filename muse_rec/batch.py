"""`Batch`: the one currency between the data pipeline and the model.

Every ID is already a table row (remapped, 0 = padding/OOV), every sequence padded, the short
sequence and the SCL keys derived: the model only looks things up. Sequences are left-padded to
fixed lengths, so each KeyedJaggedTensor has constant lengths and `sequence(key)` can view a
feature as a (B, L) matrix without copying.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from muse_rec.data import schema

ID_FEATURES = (schema.USER, *schema.USER_ATTRS, schema.TARGET_ITEM, schema.TARGET_CATE, *schema.ITEM_ATTRS)
"""Single-valued features (one row per sample), for EmbeddingBagCollections."""
SEQUENCE_FEATURES = (schema.HIST_ITEMS, schema.HIST_CATES, schema.SHORT_ITEMS, schema.SHORT_CATES)
"""Per-position features (long, long, short, short), for EmbeddingCollections."""
SCL_FEATURES = (schema.SCL_TARGET, schema.SCL_LONG, schema.SCL_SHORT)
"""Rows of the frozen SCL table: target (1), long sequence (L), short sequence (S)."""


@dataclass
class Batch(Pipelineable):
    id_features: KeyedJaggedTensor
    sequence_features: KeyedJaggedTensor
    scl_features: KeyedJaggedTensor
    labels: torch.Tensor  # float32 (B,): 1.0 = click
    weights: torch.Tensor  # float32 (B,): 1.0, or 0.0 for rows that only pad a rank's last batch
    user_ids: torch.Tensor  # int64 (B,): raw 129_1 IDs, the groups of GAUC (test users are OOV rows)

    @property
    def batch_size(self) -> int:
        return self.labels.numel()

    @staticmethod
    def sequence(kjt: KeyedJaggedTensor, key: str) -> torch.Tensor:
        """Feature `key` of a fixed-length KJT as a (B, length) matrix (a view, no copy)."""
        jagged = kjt[key]
        return jagged.values().view(jagged.lengths().numel(), -1)

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(
            id_features=self.id_features.to(device, non_blocking=non_blocking),
            sequence_features=self.sequence_features.to(device, non_blocking=non_blocking),
            scl_features=self.scl_features.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
            weights=self.weights.to(device, non_blocking=non_blocking),
            user_ids=self.user_ids.to(device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        for kjt in (self.id_features, self.sequence_features, self.scl_features):
            kjt.record_stream(stream)
        for tensor in (self.labels, self.weights, self.user_ids):
            tensor.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(
            id_features=self.id_features.pin_memory(),
            sequence_features=self.sequence_features.pin_memory(),
            scl_features=self.scl_features.pin_memory(),
            labels=self.labels.pin_memory(),
            weights=self.weights.pin_memory(),
            user_ids=self.user_ids.pin_memory(),
        )
