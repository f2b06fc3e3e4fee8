"""`Batch`: the one currency between the data pipeline and the model.

Every ID is already a table row (remapped, 0 = padding/OOV), every sequence left-padded to a
fixed length L and the SCL keys derived: the model only looks things up. The KJTs are laid out
for the modules that consume them: `id_features` for an EmbeddingBagCollection, and
`sequence_features` / `scl_features` for EmbeddingCollections, the target item and category
sitting beside the sequences because they share the item and category tables. With constant
lengths, `sequence(kjt, key)` views a feature as a (B, length) matrix without copying; the short
sequence of the reference (`150_1_180`, `151_1_180`, `150_1_180_c`) is the view `[:, -50:]` of
the long one, so it is neither stored twice nor looked up twice.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from muse_rec.data import schema

ID_FEATURES = (schema.USER, *schema.USER_ATTRS, *schema.ITEM_ATTRS)
"""Single-valued features with tables of their own (one row per sample): EmbeddingBagCollection."""
SEQUENCE_FEATURES = (schema.TARGET_ITEM, schema.TARGET_CATE, schema.HIST_ITEMS, schema.HIST_CATES)
"""Item and category table lookups: lengths 1, 1, L, L. EmbeddingCollection."""
SCL_FEATURES = (schema.SCL_TARGET, schema.SCL_LONG)
"""Rows of the frozen SCL table: target (1) and sequence (L)."""


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
