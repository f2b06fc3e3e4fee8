"""`Batch`: the one currency between the data pipeline and the model, and `BatchLayout`, what it holds.

Every ID is already a table row (remapped, 0 = padding/OOV), every sequence left-padded to a
fixed length and the SCL keys derived: the model only looks things up. The KJTs are laid out
for the modules that consume them: `id_features` for an EmbeddingBagCollection, and
`sequence_features` / `scl_features` for EmbeddingCollections, the target item and category
sitting beside the sequences because they share the item and category tables. With constant
lengths, `sequence(kjt, key)` views a feature as a (B, length) matrix without copying.

Which sequence features there are follows from the model config (`batch_layout`):
- `model.gsu_stage: model` (and lemur): the whole long sequence (150_2_180, 151_2_180, length L)
  and the SCL keys of the target and the sequence; the short sequence of the reference is the
  view `[:, -S:]` of the long one, so it is neither stored twice nor looked up twice.
- `gsu_stage: loader`: the loader ran the GSU, so muse and sim_hard carry the K kept positions
  (`TOP_ITEMS`, `TOP_CATES`) and the last S positions (`SHORT_ITEMS`, `SHORT_CATES`), din only the
  last S, and sim_soft (which scores with trainable embeddings) the whole sequence; no SCL keys,
  but the SCL cosines of target and carried positions as dense tensors (`top_cosines`,
  `short_cosines`). The model's tables are then looked up at the rows the loss uses only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from muse_rec import schema
from muse_rec.config import ModelConfig

ID_FEATURES = (schema.USER, *schema.USER_ATTRS, *schema.ITEM_ATTRS)
"""Single-valued features with tables of their own (one row per sample): EmbeddingBagCollection."""
TARGET_FEATURES = (schema.TARGET_ITEM, schema.TARGET_CATE)
LONG_FEATURES = (schema.HIST_ITEMS, schema.HIST_CATES)
TOP_FEATURES = (schema.TOP_ITEMS, schema.TOP_CATES)
SHORT_FEATURES = (schema.SHORT_ITEMS, schema.SHORT_CATES)
SEQUENCE_FEATURES = (*TARGET_FEATURES, *LONG_FEATURES)
"""`sequence_features` with the whole sequence (gsu_stage model): lengths 1, 1, L, L."""
ITEM_TABLE_FEATURES = (schema.TARGET_ITEM, schema.HIST_ITEMS, schema.TOP_ITEMS, schema.SHORT_ITEMS)
"""Features looked up in the item table (the others of `sequence_features` in the category table)."""
SCL_FEATURES = (schema.SCL_TARGET, schema.SCL_LONG)
"""Rows of the frozen SCL table: target (1) and sequence (L)."""

Selection = Literal["all", "muse", "sim_hard", "none"]


@dataclass(frozen=True)
class BatchLayout:
    """What the loader assembles. `long`: which positions of the long sequence the batch carries:
    'all' L of them, the K kept by the loader's GSU ('muse', 'sim_hard'), or 'none' (din).
    `scl_features`: the SCL-table keys it carries (gsu_stage model); none means the loader
    computes SCL cosines instead. The default is the model stage with the whole sequence. Lengths
    are the data's (`data.long_seq_len`)."""

    long: Selection = "all"
    keep_top: int = 50
    short_seq_len: int = 50
    scl_features: tuple[str, ...] = SCL_FEATURES

    @property
    def cosines(self) -> bool:
        """Whether the loader computes SCL cosines (gsu_stage loader)."""
        return not self.scl_features

    def sequence_lengths(self, long_seq_len: int) -> dict[str, int]:
        """Length per sample of each feature of `sequence_features`, in KJT key order."""
        lengths = dict.fromkeys(TARGET_FEATURES, 1)
        if self.long == "all":
            lengths |= dict.fromkeys(LONG_FEATURES, long_seq_len)
        elif self.long != "none":
            lengths |= dict.fromkeys(TOP_FEATURES, self.keep_top)
        if self.long != "all":
            lengths |= dict.fromkeys(SHORT_FEATURES, self.short_seq_len)
        return lengths

    def scl_lengths(self, long_seq_len: int) -> dict[str, int]:
        """Length per sample of each feature of `scl_features`."""
        return {key: 1 if key == schema.SCL_TARGET else long_seq_len for key in self.scl_features}


def reads_scl_sequence(config: ModelConfig) -> bool:
    """Whether lemur reads the SCL vectors of the long sequence: only when it encodes the history
    from them (history_source encoder, content_input scl); otherwise the sequence's 1000 x 128
    lookups would be thrown away. Every other method reads them at gsu_stage model."""
    lemur = config.lemur
    return config.method != "lemur" or (lemur.history_source == "encoder" and lemur.content_input == "scl")


def batch_layout(config: ModelConfig) -> BatchLayout:
    """The layout the model of `config` reads."""
    if config.stage == "model":
        scl = SCL_FEATURES if reads_scl_sequence(config) else (schema.SCL_TARGET,)
        return BatchLayout("all", config.keep_top, config.short_seq_len, scl)
    long: Selection = {"muse": "muse", "sim_hard": "sim_hard", "din": "none"}.get(config.method, "all")
    return BatchLayout(long, config.keep_top, config.short_seq_len, ())


@dataclass
class Batch(Pipelineable):
    id_features: KeyedJaggedTensor
    sequence_features: KeyedJaggedTensor
    scl_features: KeyedJaggedTensor | None  # None at gsu_stage loader
    labels: torch.Tensor  # float32 (B,): 1.0 = click
    weights: torch.Tensor  # float32 (B,): 1.0, or 0.0 for rows that only pad a rank's last batch
    user_ids: torch.Tensor  # int64 (B,): raw 129_1 IDs, the groups of GAUC (test users are OOV rows)
    top_cosines: torch.Tensor  # float32 (B, K) (sim_soft: (B, L)): SCL cosine of target and long positions; (B, 0) at gsu_stage model
    short_cosines: torch.Tensor  # float32 (B, S): of target and the last S positions; (B, 0) at gsu_stage model

    @property
    def batch_size(self) -> int:
        return self.labels.numel()

    @staticmethod
    def sequence(kjt: KeyedJaggedTensor, key: str) -> torch.Tensor:
        """Feature `key` of a fixed-length KJT as a (B, length) matrix (a view, no copy)."""
        jagged = kjt[key]
        return jagged.values().view(jagged.lengths().numel(), -1)

    def _map(self, kjt_op, tensor_op) -> "Batch":
        return Batch(
            id_features=kjt_op(self.id_features),
            sequence_features=kjt_op(self.sequence_features),
            scl_features=None if self.scl_features is None else kjt_op(self.scl_features),
            labels=tensor_op(self.labels),
            weights=tensor_op(self.weights),
            user_ids=tensor_op(self.user_ids),
            top_cosines=tensor_op(self.top_cosines),
            short_cosines=tensor_op(self.short_cosines),
        )

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return self._map(lambda k: k.to(device, non_blocking=non_blocking), lambda t: t.to(device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        for kjt in (self.id_features, self.sequence_features, self.scl_features):
            if kjt is not None:
                kjt.record_stream(stream)
        for tensor in (self.labels, self.weights, self.user_ids, self.top_cosines, self.short_cosines):
            tensor.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return self._map(lambda k: k.pin_memory(), lambda t: t.pin_memory())
