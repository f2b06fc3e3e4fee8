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

Distinct histories. The impressions of a user share one history (about 11 a user, and shards are
grouped by user), so what depends on the history alone (`HISTORY_FEATURES`: the whole long
sequence, or the last S positions at gsu_stage loader) is held once per distinct history of the
batch: those features keep the batch's stride B (TorchRec wants one stride per KJT), the first U
rows hold the U distinct histories (length L or S each) and the other B - U rows are empty;
`history_of_row` maps each impression to its history. The model looks up U x L (or U x S) rows
instead of B x L and gives each impression its history with an index_select on the lookup
(`Batch.per_impression`), whose gradient sums the impressions of a history: what the fused
optimizers do with repeated rows anyway. What depends on the target (its rows, every SCL cosine)
stays per impression. `per_impression_histories` is the plain layout, one history per impression,
that tests hold the distinct one equal to.

Distinct rows. The K kept positions of the impressions of a batch (gsu_stage loader) read far
fewer table rows than their B x K cells (at batch 1000 of the benchmark's set: 50,000 cells,
about 15,000 distinct items and 400 categories), so those features (`DISTINCT_ROW_FEATURES`) hold
the batch's distinct rows (all in the first sample's slot) and `top_cells` maps each cell to one:
TorchRec looks up, sends and updates each row once, and `Batch.per_cell` hands the cells their rows.
`per_impression_cells` is the plain layout of the cells.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from collections.abc import Iterable
from typing import Literal

import torch
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor
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
HISTORY_FEATURES = (*LONG_FEATURES, schema.SCL_LONG, *SHORT_FEATURES)
"""Features that depend on the history alone, not on the target: the whole long sequence (item,
category and SCL rows) and the last S positions. Stored once per distinct history."""
DISTINCT_ROW_FEATURES = TOP_FEATURES
"""Features stored as the batch's distinct table rows, with each impression's cells as indices into
them (`Batch.top_cells`): the K kept positions of every impression (gsu_stage loader)."""

Selection = Literal["all", "muse", "sim_hard", "none"]


@dataclass(frozen=True)
class BatchLayout:
    """What the loader assembles. `long`: which positions of the long sequence the batch carries:
    'all' L of them, the K kept by the loader's GSU ('muse', 'sim_hard'), or 'none' (din).
    `scl_features`: the SCL-table keys it carries (gsu_stage model). `cosines`: the loader computes
    the SCL cosines of the target with the positions the batch carries (gsu_stage loader, and
    lemur's `keep_scl` beside the target's SCL row). The default is the model stage with the whole
    sequence. Lengths are the data's (`data.long_seq_len`)."""

    long: Selection = "all"
    keep_top: int = 50
    short_seq_len: int = 50
    scl_features: tuple[str, ...] = SCL_FEATURES
    cosines: bool = False
    cooccurrence_pairs: int = 0
    """Anchors drawn per distinct history for lemur's co-occurrence pairs (`Batch.cooccurrence`); 0: none."""
    cooccurrence_min_cosine: float = 0.5
    cooccurrence_negatives: int = 0
    """Same-category hard negatives drawn per pair (`Batch.cooccurrence`'s columns after the third)."""
    cooccurrence_negative_max_cosine: float = 0.45

    def sequence_lengths(self, long_seq_len: int) -> dict[str, int]:
        """Length per sample of each feature of `sequence_features`, in KJT key order. A history
        feature's is per distinct history: L is the upper bound of its lookups per impression."""
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
        keeps_scl = config.method == "lemur" and config.lemur.keep_scl  # MUSE's GSU on the loader's cosines
        return _with_pairs(BatchLayout("all", config.keep_top, config.short_seq_len, scl, cosines=keeps_scl), config)
    long: Selection = {"muse": "muse", "sim_hard": "sim_hard", "din": "none"}.get(config.method, "all")
    return _with_pairs(BatchLayout(long, config.keep_top, config.short_seq_len, (), cosines=True), config)


def _with_pairs(layout: BatchLayout, config: ModelConfig) -> BatchLayout:
    """lemur training its encoder with a co-occurrence loss: the loader draws the pairs."""
    lemur = config.lemur
    if config.method != "lemur" or not lemur.trains_on_pairs:
        return layout
    return dataclasses.replace(
        layout, cooccurrence_pairs=lemur.cooccurrence_pairs, cooccurrence_min_cosine=lemur.cooccurrence_min_cosine,
        cooccurrence_negatives=lemur.cooccurrence_negatives, cooccurrence_negative_max_cosine=lemur.cooccurrence_negative_max_cosine,
    )


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
    history_of_row: torch.Tensor  # int64 (B,): each impression's distinct history (0..U-1)
    num_histories: int  # U, the distinct histories the HISTORY_FEATURES hold. A Python
    # int, not a tensor: the model views the (U x L) lookup as (U, L, D) without a device sync
    top_cells: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    # int64 (B, K) per DISTINCT_ROW_FEATURES key stored as distinct rows: each kept cell's index
    # among that feature's values; empty when the batch holds its cells per impression, or none
    cooccurrence: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(0, 3, dtype=torch.int64))
    # int64 (P, 3 + N): lemur's co-occurrence pairs (`muse_rec.data.cooccurrence`): anchor item row,
    # positive item row, distinct history, then N hard negatives as positions u * L + j of the
    # distinct histories (-1: none); P = 0 unless model.lemur.cooccurrence_weight > 0

    @property
    def batch_size(self) -> int:
        return self.labels.numel()

    def per_impression(self, history_values: torch.Tensor, *width: int) -> torch.Tensor:
        """A history feature's values or lookups, (U x L, *width) in the order of the distinct
        histories, as (B, L, *width): each impression's history. Differentiable: the gradient of an
        impression's positions flows to its history's rows, summed over the impressions sharing it."""
        return select_rows(history_values.view(self.num_histories, -1, *width), self.history_of_row)

    def per_cell(self, key: str, values: torch.Tensor, *width: int) -> torch.Tensor:
        """A DISTINCT_ROW_FEATURES feature's values or lookups, (R, *width) for its R distinct rows,
        as (B, K, *width): each impression's kept cells. Differentiable like `per_impression`: a
        row's gradient is the sum over the cells that read it. A batch that stores the feature per
        impression (`per_impression_cells`) has its (B x K, *width) values viewed as they are."""
        cells = self.top_cells.get(key)
        if cells is None:
            return values.view(self.batch_size, -1, *width)
        return select_rows(values.view(-1, *width), cells.reshape(-1)).view(*cells.shape, *width)

    def sequence(self, key: str) -> torch.Tensor:
        """Feature `key` (of any of the batch's KJTs) as a (B, length) matrix of table rows, one row
        per impression: a view of a fixed-length feature, a copy for a history feature."""
        kjts = [kjt for kjt in (self.id_features, self.sequence_features, self.scl_features) if kjt is not None and key in kjt.keys()]
        if not kjts:
            raise KeyError(f"feature {key!r} is in none of the batch's KJTs")
        values = kjts[0][key].values()
        if key in DISTINCT_ROW_FEATURES:
            return self.per_cell(key, values)
        return self.per_impression(values) if key in HISTORY_FEATURES else values.view(self.batch_size, -1)

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
            history_of_row=tensor_op(self.history_of_row),
            num_histories=self.num_histories,
            top_cells={key: tensor_op(cells) for key, cells in self.top_cells.items()},
            cooccurrence=tensor_op(self.cooccurrence),
        )

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return self._map(lambda k: k.to(device, non_blocking=non_blocking), lambda t: t.to(device, non_blocking=non_blocking))

    def record_stream(self, stream: torch.Stream) -> None:
        for kjt in (self.id_features, self.sequence_features, self.scl_features):
            if kjt is not None:
                kjt.record_stream(stream)
        for tensor in (self.labels, self.weights, self.user_ids, self.top_cosines, self.short_cosines, self.history_of_row, self.cooccurrence, *self.top_cells.values()):
            tensor.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return self._map(lambda k: k.pin_memory(), lambda t: t.pin_memory())


def select_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`values.index_select(0, index)`, differentiable, its gradient summed per row from a
    contiguous copy (`_SelectRows`)."""
    return _SelectRows.apply(values, index)


class _SelectRows(torch.autograd.Function):
    """`values.index_select(0, index)`, whose backward makes the incoming gradient contiguous
    before the `index_add_` autograd would run: the gradient of a lookup the dense arch
    concatenates with another arrives as a strided slice (the backward of `torch.cat`), on which
    index_add_ is about 9x slower on CPU (8 ms instead of 1 for 1000 x 50 x 16 floats). The sums
    are the same, bit for bit: only the layout of the gradient changes, not their order."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.rows = values.shape[0]
        return values.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (index,) = ctx.saved_tensors
        summed = grad.new_zeros(ctx.rows, *grad.shape[1:]).index_add_(0, index, grad.contiguous())
        return summed, None


def per_impression_cells(batch: Batch) -> Batch:
    """`batch` with every DISTINCT_ROW_FEATURES feature stored per impression (K rows each, no
    `top_cells`): the plain layout of the kept cells, which the distinct-row one is tested against."""
    if not batch.top_cells:
        return batch
    return dataclasses.replace(batch, sequence_features=_per_impression_kjt(batch, batch.sequence_features, batch.top_cells), top_cells={})


def per_impression_histories(batch: Batch) -> Batch:
    """`batch` in the plain layout: every impression holds its own copy of its history (U = B,
    `history_of_row` the identity) and of its kept cells (`per_impression_cells`). The reference the
    distinct layouts are tested against."""
    batch = per_impression_cells(batch)
    if not batch.num_histories:
        return batch
    size = batch.batch_size
    return dataclasses.replace(
        batch,
        sequence_features=_per_impression_kjt(batch, batch.sequence_features, HISTORY_FEATURES),
        scl_features=None if batch.scl_features is None else _per_impression_kjt(batch, batch.scl_features, HISTORY_FEATURES),
        history_of_row=torch.arange(size, device=batch.history_of_row.device),
        num_histories=size,
    )


def _per_impression_kjt(batch: Batch, kjt: KeyedJaggedTensor, keys: Iterable[str]) -> KeyedJaggedTensor:
    """`kjt` with each of `keys` it holds stored per impression: `batch.sequence(key)`, a (B, length)
    block of rows, as length values for each of the B samples."""
    jagged = dict(kjt.to_dict())  # a copy: the KJT caches the dict it returns
    for key in keys:
        if key in jagged:
            rows = batch.sequence(key)
            jagged[key] = JaggedTensor(values=rows.reshape(-1), lengths=torch.full_like(jagged[key].lengths(), rows.shape[1]))
    return KeyedJaggedTensor.from_jt_dict(jagged)
