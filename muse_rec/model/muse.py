"""The MUSE family assembled: TorchRec tables (sparse arch) feeding GSU, ESU and the tower (dense arch).

`MuseModel.forward(batch)` returns `(loss, (loss, scores, labels, weights, user_ids))`, the
contract of TorchRec's train pipelines. The tables are plain TorchRec modules; sharding is applied
from outside by `muse_rec.distributed` (DistributedModelParallel), as DMP intends. Every sequence
position is looked up (the pipeline can then overlap all lookups with the previous step) and the
GSU selects among the looked-up rows: the same values as selecting IDs first, as the reference
does, then looking them up.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from muse_rec.batch import ID_FEATURES, SEQUENCE_FEATURES, Batch
from muse_rec.config import ModelConfig
from muse_rec.data import schema
from muse_rec.model import gsu
from muse_rec.model.esu import SelfAttentiveTargetAttention, SimTier, TargetAttention, mean_pool
from muse_rec.model.tables import ReplicatedInt8Table, id_table_configs, scl_features, scl_table_config, sequence_table_configs
from muse_rec.model.tower import Tower, tower_input, tower_input_dim, two_class_loss_and_prob

AD_ATTRIBUTES = schema.ITEM_ATTRS
USER_FEATURES = (schema.USER, *schema.USER_ATTRS)


class DenseInputs(NamedTuple):
    """What the dense arch reads: embeddings (row 0 already zeroed) and the category rows for sim_hard.

    A NamedTuple, not a dataclass: TorchRec's pipeline traces `MuseModel.forward` with torch.fx,
    which passes named tuples of proxies into the (untraced, leaf) dense module.
    """

    user: torch.Tensor  # (B, 3D + 3D/2): 129_1, 130_1..130_5
    ad_attributes: torch.Tensor  # (B, 2D): 213, 214
    target_item: torch.Tensor  # (B, D)
    target_cate: torch.Tensor  # (B, D)
    items: torch.Tensor  # (B, L, D)
    cates: torch.Tensor  # (B, L, D)
    target_scl: torch.Tensor  # (B, 128) float32
    scl: torch.Tensor  # (B, L, 128) float32; (B, 0, 128) where the SCL sequence is not read (`reads_scl_sequence`)
    cate_rows: torch.Tensor  # (B, L) category-table rows of the sequence
    target_cate_row: torch.Tensor  # (B,)
    present: torch.Tensor  # (B, L) bool: a behaviour, not padding (used by the masked variant only)


class MuseDense(nn.Module):
    """GSU (no gradient), ESU and the Dice tower: plain PyTorch, replicated by DDP. `extra_inputs`
    features (none in the MUSE family) follow the reference's tower input."""

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
        c = self.config
        target = torch.cat([x.target_item, x.target_cate], dim=-1)
        sequence = torch.cat([x.items, x.cates], dim=-1)
        short, short_scl = sequence[:, -c.short_seq_len :], x.scl[:, -c.short_seq_len :]
        short_mask = x.present[:, -c.short_seq_len :] if c.masked else None
        short_similarity = gsu.cosine(x.target_scl.unsqueeze(1), short_scl)
        if c.method == "din":
            long_attention = long_mean = torch.zeros_like(target)
            simtier_long = target.new_zeros(target.shape[0], self.simtier_long.bins)
        else:
            top, top_scl, top_mask = self._retrieve(x, target, sequence)
            long_similarity = gsu.cosine(x.target_scl.unsqueeze(1), top_scl)
            long_attention = self.long_attention(target, top, long_similarity, top_mask)
            long_mean = mean_pool(top, top_mask)
            simtier_long = self.simtier_long(long_similarity, top_mask)
        features = tower_input(
            short_attention=self.short_attention(target, short, short_mask),
            long_attention=long_attention,
            long_mean=long_mean,
            short_mean=mean_pool(short, short_mask),
            ad=torch.cat([x.target_item, x.target_cate, x.ad_attributes], dim=-1),
            user=x.user,
            simtier_short=self.simtier_short(short_similarity, short_mask),
            simtier_long=simtier_long,
        )
        return self.tower(features if extra is None else torch.cat([features, extra], dim=-1))

    def _retrieve(
        self, x: DenseInputs, target: torch.Tensor, sequence: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The GSU's top-K embeddings, SCL vectors and (masked variant) presence."""
        k, method = self.config.keep_top, self.config.method
        valid = None
        with torch.no_grad():
            if method in ("muse", "lemur"):  # lemur: the encoder's representations stand in the SCL vectors' place
                positions = gsu.top_k_positions(gsu.gsu_scores(x.target_scl, x.scl), k)
            elif method == "sim_soft":
                positions = gsu.top_k_positions(gsu.gsu_scores(target, sequence), k)
            else:
                positions, valid = gsu.sim_hard_positions(x.cate_rows, x.target_cate_row, k)
        top, top_scl = gsu.gather_positions(sequence, positions), gsu.gather_positions(x.scl, positions)
        if valid is not None:  # sim_hard: slots past the match count read as item, category, SCL key 0
            top, top_scl = top * valid.unsqueeze(-1), top_scl * valid.unsqueeze(-1)
        mask = None
        if self.config.masked:
            mask = gsu.gather_positions(x.present, positions)
            mask = mask & valid if valid is not None else mask
        return top, top_scl, mask


class MuseModel(nn.Module):
    """Sparse arch (three TorchRec collections) + `MuseDense`."""

    TOWER_EXTRA_INPUTS = 0
    """Features a subclass adds after the reference's tower input (see `LemurModel`)."""

    def __init__(self, config: ModelConfig, table_rows: dict[str, int], device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        self.scl_features = scl_features(config)
        self.id_tables = EmbeddingBagCollection(id_table_configs(config, table_rows), device=device)
        self.sequence_tables = EmbeddingCollection(sequence_table_configs(config, table_rows), device=device)
        if config.scl_storage == "fp16_sharded":
            self.scl_table = EmbeddingCollection([scl_table_config(table_rows["scl"], self.scl_features)], device=device)
        else:
            self.scl_table = ReplicatedInt8Table(table_rows["scl"])
        self.dense = MuseDense(config, self.TOWER_EXTRA_INPUTS)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        logits = self.dense(self.dense_inputs(batch))
        loss, scores = two_class_loss_and_prob(logits, batch.labels, batch.weights)
        return loss, (loss.detach(), scores.detach(), batch.labels, batch.weights, batch.user_ids)

    def dense_inputs(self, batch: Batch) -> DenseInputs:
        """Look everything up. Traced by torch.fx in TorchRec's pipeline: no Python control flow on
        tensors, no iteration over outputs, and `detach` (not `no_grad`, which tracing drops) to
        keep the frozen SCL table out of backward."""
        size, dim = batch.batch_size, self.config.embedding_dim
        pooled = self.id_tables(batch.id_features)
        id_rows = batch.id_features.to_dict()
        single = {key: _zero_row0(pooled[key], id_rows[key].values()) for key in ID_FEATURES}
        looked_up = self.sequence_tables(batch.sequence_features)
        rows = batch.sequence_features.to_dict()
        seq = {key: _zero_row0(looked_up[key].values(), rows[key].values()).view(size, -1, dim) for key in SEQUENCE_FEATURES}
        scl_out = self.scl_table(batch.scl_features)
        scl = {key: scl_out[key].values().detach().float().view(size, -1, schema.SCL_DIM) for key in self.scl_features}
        item_rows = rows[schema.HIST_ITEMS].values().view(size, -1)
        cate_rows = rows[schema.HIST_CATES].values().view(size, -1)
        return DenseInputs(
            user=torch.cat([single[key] for key in USER_FEATURES], dim=-1),
            ad_attributes=torch.cat([single[key] for key in AD_ATTRIBUTES], dim=-1),
            target_item=seq[schema.TARGET_ITEM][:, 0],
            target_cate=seq[schema.TARGET_CATE][:, 0],
            items=seq[schema.HIST_ITEMS],
            cates=seq[schema.HIST_CATES],
            target_scl=scl[schema.SCL_TARGET][:, 0],
            scl=scl[schema.SCL_LONG] if schema.SCL_LONG in scl else scl[schema.SCL_TARGET][:, :0],  # lemur: the bank's
            cate_rows=cate_rows,
            target_cate_row=rows[schema.TARGET_CATE].values(),
            present=(item_rows != 0) | (cate_rows != 0),
        )


def _zero_row0(embeddings: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Lookups of row 0 (padding / out of vocabulary) read as zeros and send no gradient to it."""
    return embeddings * (rows != 0).unsqueeze(-1).to(embeddings.dtype)
