"""The model of a config's method."""
from __future__ import annotations

import torch

from muse_rec.config import ModelConfig
from muse_rec.model.lemur import LemurModel
from muse_rec.model.muse import MuseModel


def make_model(config: ModelConfig, table_rows: dict[str, int], device: torch.device | None = None) -> MuseModel:
    """`LemurModel` for method lemur, else `MuseModel`; tables sized by `table_rows` (usually on the meta device)."""
    cls = LemurModel if config.method == "lemur" else MuseModel
    return cls(config, table_rows, device=device)
