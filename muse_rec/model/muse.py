"""The MUSE family assembled: TorchRec tables (sparse arch) feeding GSU, ESU and the tower (dense arch).

`MuseModel.forward(batch)` returns `(loss, (loss, scores, labels, weights, user_ids))`, the
contract of TorchRec's train pipelines. The tables are plain TorchRec modules; sharding is applied
from outside by `muse_rec.distributed` (DistributedModelParallel), as DMP intends.

Where the GSU runs (`model.gsu_stage`, `muse_rec.batch.BatchLayout`):
- loader (muse, sim_hard, din): the batch holds the target, the K kept positions and the last S
  with their SCL cosines; the model looks up exactly those rows, so a fused optimizer touches
  only rows the loss uses, and `DenseInputs` are built directly.
- model (muse, sim_hard, din): the whole sequence is looked up (`FullInputs`) with the SCL
  table's cosines, and `select` keeps K positions. The batch holds each distinct history once
  (`muse_rec.batch`): U x L rows are looked up, not B x L, and `select` gathers each impression's
  kept and last positions from its history's lookup (no per-impression copy).
- sim_soft (either stage) and lemur choose their positions in the model, then look up the targets
  and each impression's K kept and S last cells alone, with gradient (`kept_inputs`; their
  distinct rows): so a fused optimizer never sees the other rows of the histories, which under
  fused Adam (CUDA) would move even at a zero gradient once they have momentum. sim_soft scores
  with the current trainable embeddings, so it first looks up the targets and the U distinct
  histories without gradient (`_sim_soft_inputs`); lemur ranks cosines its ID tables do not enter
  (its representations', or with `keep_scl` the loader's SCL cosines). The kept IDs come from the
  forward, which TorchRec's SparseDist pipeline cannot run ahead: both train under
  `muse_rec.train.pipeline.train_pipeline`'s eager pipeline. `select(full_inputs(...))` is the
  plain reference of this path (tests hold them equal).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from muse_rec import schema
from muse_rec.batch import (
    DISTINCT_ROW_FEATURES, HISTORY_FEATURES, ID_FEATURES, LONG_FEATURES, TARGET_FEATURES, Batch, batch_layout, select_rows,
)
from muse_rec.config import ModelConfig
from muse_rec.model import gsu
from muse_rec.model.esu import SelfAttentiveTargetAttention, SimTier, TargetAttention, mean_pool
from muse_rec.model.tables import ReplicatedInt8Table, id_table_configs, scl_table_config, sequence_table_configs
from muse_rec.model.tower import Tower, tower_input, tower_input_dim, two_class_loss_and_prob

AD_ATTRIBUTES = schema.ITEM_ATTRS
USER_FEATURES = (schema.USER, *schema.USER_ATTRS)


class DenseInputs(NamedTuple):
    """What the dense arch reads: embeddings (row 0 already zeroed) of the target, the GSU's K kept
    positions and the last S positions, with the SCL cosine of each position and the target.

    A NamedTuple, not a dataclass: TorchRec's pipeline traces `MuseModel.forward` with torch.fx,
    which passes named tuples of proxies into the (untraced, leaf) dense module.
    """

    user: torch.Tensor  # (B, 3D + 3D/2): 129_1, 130_1..130_5
    ad_attributes: torch.Tensor  # (B, 2D): 213, 214
    target_item: torch.Tensor  # (B, D)
    target_cate: torch.Tensor  # (B, D)
    top_items: torch.Tensor  # (B, K, D); (B, 0, D) for din
    top_cates: torch.Tensor  # (B, K, D)
    top_cosines: torch.Tensor  # (B, K) float32
    top_present: torch.Tensor  # (B, K) bool: a behaviour, not padding nor a sim_hard slot past the matches (masked variant)
    short_items: torch.Tensor  # (B, S, D)
    short_cates: torch.Tensor  # (B, S, D)
    short_cosines: torch.Tensor  # (B, S) float32
    short_present: torch.Tensor  # (B, S) bool


class FullInputs(NamedTuple):
    """The whole sequence before the GSU: what `select` reads. With `history_of_row`, `items` and
    `cates` are the lookups of the batch's U distinct histories, (U, L, D), and `select` gathers
    each impression's kept and last positions from them: no (B, L, D) copy, and the gradient
    reaches only the cells kept."""

    user: torch.Tensor
    ad_attributes: torch.Tensor
    target_item: torch.Tensor
    target_cate: torch.Tensor
    items: torch.Tensor  # (B, L, D), or (U, L, D) with history_of_row
    cates: torch.Tensor  # (B, L, D), or (U, L, D) with history_of_row
    cosines: torch.Tensor  # (B, L) float32: cosine of the target's SCL vector (lemur: representation) with each position's
    cate_rows: torch.Tensor  # (B, L) category-table rows of the sequence (sim_hard)
    target_cate_row: torch.Tensor  # (B,)
    present: torch.Tensor  # (B, L) bool: a behaviour, not padding
    history_of_row: torch.Tensor | None = None  # (B,): the distinct history of each impression (`Batch`)

    def per_impression(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`items` and `cates` as (B, L, D), a copy per impression where they are per distinct
        history: what sim_soft's scoring reads (without gradient)."""
        if self.history_of_row is None:
            return self.items, self.cates
        return self.items[self.history_of_row], self.cates[self.history_of_row]


def select(x: FullInputs, config: ModelConfig) -> DenseInputs:
    """The GSU on whole sequences (no gradient to the scores): K kept positions of `x`, gathered
    with gradient, and the last `short_seq_len`. sim_hard's slots past the match count read as
    item, category and SCL key 0 (zeros, not present)."""
    k, method = config.keep_top, config.method
    valid = None
    with torch.no_grad():
        if method in ("muse", "lemur"):  # lemur: the encoder's representations stand in the SCL vectors' place
            positions = gsu.top_k_positions(gsu.scores_of(x.cosines), k)
        elif method == "sim_soft":
            positions = gsu.top_k_positions(gsu.sim_soft_scores(x.target_item, x.target_cate, *x.per_impression()), k)
        elif method == "sim_hard":
            positions, valid = gsu.sim_hard_positions(x.cate_rows, x.target_cate_row, k)
        else:  # din: no long branch
            positions = torch.zeros_like(x.cate_rows[:, :0])
    length = x.cosines.shape[1]
    last = torch.arange(length - config.short_seq_len, length, device=positions.device).expand(len(positions), -1)
    kept = [_gather_cells(t, positions, x.history_of_row) for t in (x.items, x.cates)]
    kept += [gsu.gather_positions(t, positions) for t in (x.cosines, x.present)]
    if valid is not None:
        kept = [t * valid.unsqueeze(-1) for t in kept[:2]] + [kept[2] * valid, kept[3] & valid]
    short = slice(length - config.short_seq_len, None)
    return DenseInputs(
        x.user, x.ad_attributes, x.target_item, x.target_cate, *kept,
        _gather_cells(x.items, last, x.history_of_row), _gather_cells(x.cates, last, x.history_of_row),
        x.cosines[:, short], x.present[:, short],
    )


def _gather_cells(embeddings: torch.Tensor, positions: torch.Tensor, history_of_row: torch.Tensor | None) -> torch.Tensor:
    """Embeddings (B, k, D) at `positions` (B, k) of each impression's sequence: `embeddings` per
    impression (B, L, D), or per distinct history (U, L, D) with `history_of_row` (B,)."""
    if history_of_row is None:
        return gsu.gather_positions(embeddings, positions)
    cells = history_of_row.unsqueeze(-1) * embeddings.shape[1] + positions
    return select_rows(embeddings.flatten(0, 1), cells.flatten()).view(*positions.shape, embeddings.shape[-1])


class Retrieval(nn.Module):
    """The GSU in the model. `select` as a module: a leaf of TorchRec's pipeline tracer (it holds no
    TorchRec module), so its shape checks and `no_grad` run eagerly; and the positions of the
    methods that look up only what they keep (`MuseModel.kept_inputs`): sim_soft's scoring between
    its two lookups, lemur's top-K of its cosines."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, x: FullInputs) -> DenseInputs:
        return select(x, self.config)

    @torch.no_grad()
    def cosine_positions(self, cosines: torch.Tensor) -> torch.Tensor:
        """The K positions (B, K) of the highest cosines (B, L), 0.0 scoring -1.1 (lemur's GSU on its
        representations' or the loader's SCL cosines): `select`'s positions for muse and lemur."""
        return gsu.top_k_positions(gsu.scores_of(cosines), self.config.keep_top)

    @torch.no_grad()
    def sim_soft_positions(
        self, target_item: torch.Tensor, target_cate: torch.Tensor, items: torch.Tensor, cates: torch.Tensor, history_of_row: torch.Tensor
    ) -> torch.Tensor:
        """The K positions (B, K) sim_soft keeps, from the targets' (B, D) and the distinct
        histories' (U, L, D) embeddings: `select`'s positions, bit for bit."""
        scores = gsu.distinct_history_sim_soft_scores(target_item, target_cate, items, cates, history_of_row)
        return gsu.top_k_positions(scores, self.config.keep_top)


class MuseDense(nn.Module):
    """ESU and the Dice tower over the GSU's output: plain PyTorch, replicated by DDP.
    `extra_inputs` features (none in the MUSE family) follow the reference's tower input."""

    def __init__(self, config: ModelConfig, extra_inputs: int = 0) -> None:
        super().__init__()
        self.config = config
        width = 2 * config.embedding_dim
        self.short_attention = TargetAttention(width)
        self.long_attention = SelfAttentiveTargetAttention(width)
        self.simtier_short = SimTier()
        self.simtier_long = SimTier()
        self.tower = Tower(tower_input_dim(config.embedding_dim) + extra_inputs)

    def forward(self, x: DenseInputs, extra: torch.Tensor | None = None) -> torch.Tensor:
        masked = self.config.masked
        target = torch.cat([x.target_item, x.target_cate], dim=-1)
        short = torch.cat([x.short_items, x.short_cates], dim=-1)
        short_mask = x.short_present if masked else None
        if self.config.method == "din":
            long_attention = long_mean = torch.zeros_like(target)
            simtier_long = target.new_zeros(target.shape[0], self.simtier_long.bins)
        else:
            top = torch.cat([x.top_items, x.top_cates], dim=-1)
            top_mask = x.top_present if masked else None
            long_attention = self.long_attention(target, top, x.top_cosines, top_mask)
            long_mean = mean_pool(top, top_mask)
            simtier_long = self.simtier_long(x.top_cosines, top_mask)
        features = tower_input(
            short_attention=self.short_attention(target, short, short_mask),
            long_attention=long_attention,
            long_mean=long_mean,
            short_mean=mean_pool(short, short_mask),
            ad=torch.cat([x.target_item, x.target_cate, x.ad_attributes], dim=-1),
            user=x.user,
            simtier_short=self.simtier_short(x.short_cosines, short_mask),
            simtier_long=simtier_long,
        )
        return self.tower(features if extra is None else torch.cat([features, extra], dim=-1))


class MuseModel(nn.Module):
    """Sparse arch (two or three TorchRec collections) + the GSU where it runs in the model + `MuseDense`."""

    TOWER_EXTRA_INPUTS = 0
    """Features a subclass adds after the reference's tower input (see `LemurModel`)."""

    def __init__(self, config: ModelConfig, table_rows: dict[str, int], device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        self.layout = batch_layout(config)
        self.sequence_keys = tuple(self.layout.sequence_lengths(config.keep_top))  # the keys alone: lengths are the data's
        self.id_tables = EmbeddingBagCollection(id_table_configs(config, table_rows), device=device)
        self.sequence_tables = EmbeddingCollection(sequence_table_configs(config, table_rows, self.sequence_keys), device=device)
        self.scl_table: nn.Module | None = None
        if self.layout.scl_features and config.scl_storage == "fp16_sharded":
            self.scl_table = EmbeddingCollection([scl_table_config(table_rows["scl"], self.layout.scl_features)], device=device)
        elif self.layout.scl_features:
            self.scl_table = ReplicatedInt8Table(table_rows["scl"])
        self.retrieval = Retrieval(config)
        self.dense = MuseDense(config, self.TOWER_EXTRA_INPUTS)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        logits = self.dense(self.dense_inputs(batch))
        loss, scores = two_class_loss_and_prob(logits, batch.labels, batch.weights)
        return loss, (loss.detach(), scores.detach(), batch.labels, batch.weights, batch.user_ids)

    # Everything below is traced by torch.fx in TorchRec's pipeline: no Python control flow on
    # tensors (only on the config), no iteration over outputs, and `detach` (not `no_grad`, which
    # tracing drops) to keep the frozen SCL table out of backward.
    def dense_inputs(self, batch: Batch) -> DenseInputs:
        """Look everything up; run the GSU here unless the loader did."""
        if self.layout.long != "all":
            return self._selected_inputs(batch)
        cosines = batch.top_cosines if self.layout.cosines else gsu.scl_cosines(*self.scl_vectors(batch))
        if self.config.method == "sim_soft":
            return self._sim_soft_inputs(batch, cosines)
        return self.retrieval(self.full_inputs(batch, cosines))

    def _single_lookups(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(user, ad attributes): the single-valued features' embeddings, concatenated."""
        pooled = self.id_tables(batch.id_features)
        id_rows = batch.id_features.to_dict()
        single = {key: _zero_row0(pooled[key], id_rows[key].values()) for key in ID_FEATURES}
        return torch.cat([single[key] for key in USER_FEATURES], dim=-1), torch.cat([single[key] for key in AD_ATTRIBUTES], dim=-1)

    def _lookups(
        self, batch: Batch, distinct_histories: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(user, ad attributes, embeddings (B, length, D) and rows (B, length) by sequence feature).
        A history feature is looked up once per distinct history, a kept-cell feature once per
        distinct row of the batch, then given to each impression; with `distinct_histories`, a
        history feature's embeddings stay (U, length, D), one per distinct history."""
        size, dim = batch.batch_size, self.config.embedding_dim
        user, ad = self._single_lookups(batch)
        looked_up = self.sequence_tables(batch.sequence_features)
        jagged = batch.sequence_features.to_dict()
        rows, embeddings = {}, {}
        for key in self.sequence_keys:
            row = jagged[key].values()
            embedding = _zero_row0(looked_up[key].values(), row)
            if key in HISTORY_FEATURES:
                rows[key] = batch.per_impression(row)
                embeddings[key] = embedding.view(batch.num_histories, -1, dim) if distinct_histories else batch.per_impression(embedding, dim)
            elif key in DISTINCT_ROW_FEATURES:
                rows[key], embeddings[key] = batch.per_cell(key, row), batch.per_cell(key, embedding, dim)
            else:
                rows[key], embeddings[key] = row.view(size, -1), embedding.view(size, -1, dim)
        return user, ad, embeddings, rows

    def _selected_inputs(self, batch: Batch) -> DenseInputs:
        """gsu_stage loader, muse / sim_hard / din: the batch holds the kept and short positions."""
        user, ad, seq, rows = self._lookups(batch)
        short_present = (rows[schema.SHORT_ITEMS] != 0) | (rows[schema.SHORT_CATES] != 0)
        if schema.TOP_ITEMS in seq:
            top_items, top_cates = seq[schema.TOP_ITEMS], seq[schema.TOP_CATES]
            top_present = (rows[schema.TOP_ITEMS] != 0) | (rows[schema.TOP_CATES] != 0)
        else:  # din
            top_items, top_cates, top_present = seq[schema.SHORT_ITEMS][:, :0], seq[schema.SHORT_CATES][:, :0], short_present[:, :0]
        return DenseInputs(
            user, ad, seq[schema.TARGET_ITEM][:, 0], seq[schema.TARGET_CATE][:, 0],
            top_items, top_cates, batch.top_cosines, top_present,
            seq[schema.SHORT_ITEMS], seq[schema.SHORT_CATES], batch.short_cosines, short_present,
        )

    def _sim_soft_inputs(self, batch: Batch, cosines: torch.Tensor) -> DenseInputs:
        """sim_soft: score the whole histories without gradient, then look up with gradient the
        targets and the kept and last cells alone (see the module's doc). The same `DenseInputs`,
        loss and table gradients as `select(full_inputs(...))`, which reads one lookup for both."""
        dim = self.config.embedding_dim
        rows = batch.sequence_features.to_dict()
        with torch.no_grad():  # eager (see `muse_rec.train.pipeline`): no backward, so no optimizer sees these rows
            scoring = self.sequence_tables(batch.sequence_features)
            looked_up = {key: _zero_row0(scoring[key].values(), rows[key].values()) for key in (*TARGET_FEATURES, *LONG_FEATURES)}
            histories = (looked_up[key].view(batch.num_histories, -1, dim) for key in LONG_FEATURES)
            positions = self.retrieval.sim_soft_positions(*(looked_up[key] for key in TARGET_FEATURES), *histories, batch.history_of_row)
        return self.kept_inputs(batch, positions, cosines)

    def kept_inputs(self, batch: Batch, positions: torch.Tensor, cosines: torch.Tensor) -> DenseInputs:
        """`DenseInputs` of the K `positions` (B, K) each impression keeps: the targets and the kept
        and last cells looked up with gradient, and nothing else of the histories (sim_soft after
        scoring, lemur from its representations' cosines)."""
        size, dim, k, short = batch.batch_size, self.config.embedding_dim, self.config.keep_top, self.config.short_seq_len
        rows = batch.sequence_features.to_dict()
        length = cosines.shape[1]
        cells = torch.cat([positions, torch.arange(length - short, length, device=positions.device).expand(size, -1)], dim=1)
        histories = batch.history_of_row.unsqueeze(-1)  # each cell read from its distinct history, no (B, L) copy
        cell_rows = {key: rows[key].values().view(batch.num_histories, length)[histories, cells] for key in LONG_FEATURES}
        kept, distinct_rows, cell_index = _distinct_cells(batch.sequence_features, rows, cell_rows)
        trained = self.sequence_tables(kept)
        targets = [_zero_row0(trained[key].values(), rows[key].values()) for key in TARGET_FEATURES]
        items, cates = (
            select_rows(_zero_row0(trained[key].values(), distinct_rows[key]), cell_index[key].flatten()).view(size, -1, dim)
            for key in LONG_FEATURES
        )
        present = (cell_rows[schema.HIST_ITEMS] != 0) | (cell_rows[schema.HIST_CATES] != 0)
        user, ad = self._single_lookups(batch)
        return DenseInputs(
            user, ad, *targets,
            items[:, :k], cates[:, :k], gsu.gather_positions(cosines, positions), present[:, :k],
            items[:, k:], cates[:, k:], cosines[:, length - short:], present[:, k:],
        )

    def full_inputs(self, batch: Batch, cosines: torch.Tensor) -> FullInputs:
        """The whole sequence looked up, with the given SCL cosines (B, L); the histories' embeddings
        once per distinct history, for `select` to gather the kept and last positions from."""
        user, ad, seq, rows = self._lookups(batch, distinct_histories=True)
        item_rows, cate_rows = rows[schema.HIST_ITEMS], rows[schema.HIST_CATES]
        return FullInputs(
            user, ad, seq[schema.TARGET_ITEM][:, 0], seq[schema.TARGET_CATE][:, 0],
            seq[schema.HIST_ITEMS], seq[schema.HIST_CATES], cosines,
            cate_rows, rows[schema.TARGET_CATE][:, 0], (item_rows != 0) | (cate_rows != 0), batch.history_of_row,
        )

    def scl_vectors(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """SCL vectors of the target (B, 128) and of the sequence (B, L, 128); (B, 0, 128) where the
        sequence's are not read (lemur, `muse_rec.batch.reads_scl_sequence`). gsu_stage model only."""
        out = self.scl_table(batch.scl_features)
        scl = {key: out[key].values().detach().float() for key in self.layout.scl_features}
        target = scl[schema.SCL_TARGET].view(batch.batch_size, 1, schema.SCL_DIM)
        if schema.SCL_LONG not in scl:
            return target[:, 0], target[:, :0]
        return target[:, 0], batch.per_impression(scl[schema.SCL_LONG], schema.SCL_DIM)


def _distinct_cells(
    features: KeyedJaggedTensor, rows: dict[str, JaggedTensor], cell_rows: dict[str, torch.Tensor]
) -> tuple[KeyedJaggedTensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The lookup of `MuseModel.kept_inputs`: `features` (the targets and the distinct histories)
    with each long feature holding instead the distinct table rows of its cells `cell_rows`
    (B, K + S), all in the first sample's slot, as `Batch.top_cells` lays them out. Returns that KJT, the distinct rows and
    each cell's index among them. Same keys in the same order as `features`: a sharded collection
    fixes its input's key order at its first call."""
    size = features.stride()
    values, lengths, distinct, index = [], [], {}, {}
    for key in features.keys():
        if key in cell_rows:
            distinct[key], index[key] = torch.unique(cell_rows[key], return_inverse=True)
            values.append(distinct[key])
            lengths.append(torch.zeros(size, dtype=features.lengths().dtype, device=values[-1].device))
            lengths[-1][0] = len(distinct[key])
        else:
            values.append(rows[key].values())
            lengths.append(rows[key].lengths())
    return KeyedJaggedTensor(features.keys(), torch.cat(values), lengths=torch.cat(lengths), stride=size), distinct, index


def _zero_row0(embeddings: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Lookups of row 0 (padding / out of vocabulary) read as zeros and send no gradient to it."""
    return embeddings * (rows != 0).unsqueeze(-1).to(embeddings.dtype)
