"""`model.gsu_stage`: the GSU in the loader and the GSU in the model keep the same positions with
the same cosines, give the same loss, and train to the same weights (unsharded, plain SGD)."""
from __future__ import annotations

import pytest
import torch

from muse_rec import schema
from muse_rec.batch import batch_layout
from muse_rec.config import load_config
from muse_rec.data.feature_map import FeatureMaps
from muse_rec.data.layout import DatasetLayout
from muse_rec.data.loader import ShardDataset
from muse_rec.distributed.table_weights import load_scl_table
from muse_rec.model import gsu
from muse_rec.model.factory import make_model

STEPS = 3


def stage_run(root, method: str, stage: str, initial: dict | None) -> tuple[list, list[torch.Tensor], dict]:
    config = load_config(None, [f"data.root={root}", "data.batch_size=32", "model.keep_top=20", f"model.method={method}", f"model.gsu_stage={stage}"])
    maps = FeatureMaps.load(DatasetLayout(root), "p90")
    torch.manual_seed(0)
    model = make_model(config.model, maps.table_rows())
    if initial is not None:
        assert not model.load_state_dict(initial, strict=False).unexpected_keys
    load_scl_table(model, maps.scl, torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    inputs, losses = [], []
    for batch, _ in zip(ShardDataset(config.data, "train", 0, 1, maps, layout=batch_layout(config.model)), range(STEPS)):
        x = model.dense_inputs(batch)
        inputs.append(x)
        loss, _ = model(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return inputs, losses, {k: v.detach().clone() for k, v in model.state_dict().items() if "scl_table" not in k}


@pytest.mark.parametrize("method", ["muse", "sim_hard", "din", "sim_soft"])
def test_both_stages_keep_the_same_positions_and_train_the_same(synthetic_root, method):
    model_inputs, model_losses, model_weights = stage_run(synthetic_root, method, "model", None)
    loader_inputs, loader_losses, loader_weights = stage_run(synthetic_root, method, "loader", _initial(synthetic_root, method))
    first_model, first_loader = model_inputs[0], loader_inputs[0]
    # before any step the two stages see identical numbers: same kept rows, bitwise-equal cosines
    # (both compute them exactly, `gsu.scl_cosines`), hence the same loss
    for field in first_model._fields:
        assert torch.equal(getattr(first_loader, field), getattr(first_model, field)), field
    assert first_model.top_items.shape[1] == (0 if method == "din" else 20)
    assert torch.equal(loader_losses[0], model_losses[0])
    # later steps: embedding gradients are float32 sums over the same positions in another order
    torch.testing.assert_close(torch.stack(loader_losses), torch.stack(model_losses))
    assert loader_weights.keys() == model_weights.keys()
    for key, value in loader_weights.items():
        torch.testing.assert_close(value, model_weights[key], msg=lambda m: f"{key}: {m}")


def _initial(root, method: str) -> dict:
    """The model stage's initial weights (the same seed; made again, the SCL table left out)."""
    config = load_config(None, [f"data.root={root}", "model.keep_top=20", f"model.method={method}", "model.gsu_stage=model"])
    torch.manual_seed(0)
    model = make_model(config.model, FeatureMaps.load(DatasetLayout(root), "p90").table_rows())
    return {k: v for k, v in model.state_dict().items() if "scl_table" not in k}


def test_scl_cosines_equal_the_reference_cosines_within_rounding():
    generator = torch.Generator().manual_seed(0)
    values = torch.randint(-127, 128, (4, 30, schema.SCL_DIM), generator=generator).float()
    values[:, :5] = 0  # pads
    exact, reference = gsu.scl_cosines(values[:, 0], values), gsu.cosines(values[:, 0], values)
    torch.testing.assert_close(exact, reference, rtol=0, atol=schema.SCL_DIM * torch.finfo(torch.float32).eps)
    assert torch.equal(exact[:, :5], torch.zeros(4, 5))
