"""TorchRec table configs of the MUSE family, sized from the feature maps of a data directory.

Three collections, one per kind of lookup (and one embedding dim per EmbeddingCollection):
- `id_tables` (EmbeddingBagCollection): user (129_1) and its attributes 130_1..130_5 (D/2 for
  130_3..130_5), item attributes 213 and 214: one row per sample.
- `sequence_tables` (EmbeddingCollection): the item table, shared by the target 205 and the
  sequence features of `Batch` (the whole 150_2_180, or the GSU's kept positions and the short
  sequence), and the category table, shared by 206 and the category features.
- `scl_table` (`model.gsu_stage: model` only; at gsu_stage loader the loader reads the SCL values
  file and no SCL vector reaches the model): the frozen multimodal table (128-d); its row i + 1
  is line i of the SCL values file, never trained. Either an fp16 EmbeddingCollection sharded
  like the others, or `ReplicatedInt8Table`, the int8 values themselves on every rank
  (`model.scl_storage`). Both are filled by `muse_rec.distributed.table_weights.load_scl_table`.
Row 0 of every table is padding / out of vocabulary: the model zeroes lookups of row 0, so that
row reads as the zero vector whatever it holds, and it receives no gradient.
"""
from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, EmbeddingConfig
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from muse_rec import schema
from muse_rec.batch import ID_FEATURES, ITEM_TABLE_FEATURES, SCL_FEATURES
from muse_rec.config import ModelConfig

HALF_DIM_FEATURES = ("130_3", "130_4", "130_5")
TRUNCATE_BOUND = 2.0
"""Init values lie in [-2, 2], as the reference's `trunc_normal_(std, a=-2.0, b=2.0)`: its bounds are
absolute, not in std, so at its std of 0.001 (2000 std) the init is in effect a plain normal."""
ITEM_TABLE, CATE_TABLE, SCL_TABLE = "item", "category", "scl"


def truncated_normal_init(std: float):
    """Init of trainable rows as the reference's `trunc_normal_(std=std, a=-2.0, b=2.0)`: the bounds
    are absolute, so at std 0.001 a plain N(0, std^2). TorchRec runs it on each local shard; the
    values that count are `init_trainable_tables`', the same rule, independent of the sharding."""

    def init(weight: torch.Tensor) -> None:
        with torch.no_grad():
            torch.nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-TRUNCATE_BOUND, b=TRUNCATE_BOUND)

    return init


def id_table_configs(config: ModelConfig, table_rows: dict[str, int]) -> list[EmbeddingBagConfig]:
    """One table per single-valued feature, named after it."""
    dim = config.embedding_dim
    return [
        EmbeddingBagConfig(
            name=feature,
            num_embeddings=table_rows[schema.MAP_OF_COLUMN[feature]],
            embedding_dim=dim // 2 if feature in HALF_DIM_FEATURES else dim,
            feature_names=[feature],
            init_fn=truncated_normal_init(config.init_std),
        )
        for feature in ID_FEATURES
    ]


def sequence_table_configs(config: ModelConfig, table_rows: dict[str, int], features: tuple[str, ...]) -> list[EmbeddingConfig]:
    """The item and category tables, each shared by the target and the batch's sequence `features`."""
    items = [f for f in features if f in ITEM_TABLE_FEATURES]
    return [
        EmbeddingConfig(
            name=name,
            num_embeddings=table_rows[field],
            embedding_dim=config.embedding_dim,
            feature_names=table_features,
            init_fn=truncated_normal_init(config.init_std),
        )
        for name, field, table_features in (
            (ITEM_TABLE, schema.ITEM_MAP, items),
            (CATE_TABLE, schema.CATE_MAP, [f for f in features if f not in items]),
        )
    ]


def scl_table_config(num_rows: int, features: tuple[str, ...] = SCL_FEATURES, data_type: DataType = DataType.FP16) -> EmbeddingConfig:
    """The frozen SCL table; no init (its rows are loaded from the values file)."""
    return EmbeddingConfig(
        name=SCL_TABLE,
        num_embeddings=num_rows,
        embedding_dim=schema.SCL_DIM,
        feature_names=list(features),
        data_type=data_type,
        init_fn=lambda weight: None,
    )


class ReplicatedInt8Table(nn.Module):
    """The SCL table as its int8 values file, whole on every rank: no sharding, no communication.

    Outputs like an EmbeddingCollection (key -> JaggedTensor of float32 rows, row 0 = zeros), so
    the model reads both storages the same way. The values are not a parameter (nothing can train
    them) and not in the state dict (they are the data set's file, not a training result).
    """

    def __init__(self, num_rows: int) -> None:
        super().__init__()
        self.num_rows = num_rows
        self.register_buffer("values", torch.zeros(0, schema.SCL_DIM, dtype=torch.int8), persistent=False)

    def set_values(self, values: torch.Tensor) -> None:
        """The int8 (num_rows - 1, 128) values; a tensor over a memory map stays one on CPU."""
        if values.shape != (self.num_rows - 1, schema.SCL_DIM) or values.dtype != torch.int8:
            raise ValueError(f"SCL values must be int8 of shape ({self.num_rows - 1}, {schema.SCL_DIM}), got {values.dtype} {tuple(values.shape)}")
        self.values = values

    def forward(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        out = {}
        for key, jagged in features.to_dict().items():
            rows = jagged.values()
            looked_up = self.values[(rows - 1).clamp_min(0).to(self.values.device)].to(rows.device).float()
            out[key] = JaggedTensor(values=looked_up * (rows > 0).unsqueeze(-1), lengths=jagged.lengths())
        return out
