"""The methods that look up only the positions they keep (`MuseModel.kept_inputs`): sim_soft
(scoring on a first lookup without gradient) and lemur (positions from its cosines), against the
plain reference that reads one lookup of the whole histories (`select(full_inputs(...))`): the
same dense inputs bit for bit, and the same table gradients; and the lookup that carries
gradient, which a fused optimizer steps, holds exactly the rows the loss reads."""
from __future__ import annotations

import itertools

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
from muse_rec.model.muse import select
from muse_rec.model.tower import two_class_loss_and_prob
from tests.model.test_lemur import make as make_lemur

K, SHORT = 20, 50


def model_and_batches(root, stage: str):
    config = load_config(None, [f"data.root={root}", "data.batch_size=32", f"model.keep_top={K}", "model.method=sim_soft", f"model.gsu_stage={stage}"])
    maps = FeatureMaps.load(DatasetLayout(root), "p90")
    torch.manual_seed(0)
    model = make_model(config.model, maps.table_rows())
    load_scl_table(model, maps.scl, torch.device("cpu"))
    batches = itertools.islice(ShardDataset(config.data, "train", 0, 1, maps, layout=batch_layout(config.model)), 2)
    return config, model, list(batches)


def reference_inputs(model, batch, config):
    cosines = batch.top_cosines if model.layout.cosines else gsu.scl_cosines(*model.scl_vectors(batch))
    return select(model.full_inputs(batch, cosines), config.model)


def table_gradients(model, inputs, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss, _ = two_class_loss_and_prob(model.dense(inputs), batch.labels, batch.weights)
    loss.backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None and "embeddings" in k}


@pytest.mark.parametrize("stage", ["loader", "model"])
def test_two_lookups_equal_the_one_lookup_reference(synthetic_root, stage):
    config, model, batches = model_and_batches(synthetic_root, stage)
    for batch in batches:
        fast, reference = model.dense_inputs(batch), reference_inputs(model, batch, config)
        for field in reference._fields:
            assert torch.equal(getattr(fast, field), getattr(reference, field)), field
        fast_gradients, reference_gradients = table_gradients(model, fast, batch), table_gradients(model, reference, batch)
        assert fast_gradients.keys() == reference_gradients.keys() and any(g.abs().sum() > 0 for g in reference_gradients.values())
        for key, expected in reference_gradients.items():
            torch.testing.assert_close(fast_gradients[key], expected, msg=lambda m: f"{key}: {m}")


def test_the_lookup_with_gradient_holds_only_the_rows_the_loss_reads(synthetic_root):
    config, model, batches = model_and_batches(synthetic_root, "loader")
    calls = []
    model.sequence_tables.register_forward_hook(lambda _, args, __: calls.append((torch.is_grad_enabled(), args[0].to_dict())))
    batch = batches[0]
    model(batch)
    (scoring_grad, scoring), (kept_grad, kept) = calls
    assert not scoring_grad and kept_grad
    x = model.full_inputs(batch, batch.top_cosines)
    positions = gsu.top_k_positions(gsu.sim_soft_scores(x.target_item, x.target_cate, *x.per_impression()), K)
    for key in (schema.HIST_ITEMS, schema.HIST_CATES):
        rows = batch.sequence(key)
        read = torch.cat([gsu.gather_positions(rows, positions), rows[:, -SHORT:]], dim=1)
        assert torch.equal(kept[key].values(), read.unique()), key  # each row the loss reads, once
    items = kept[schema.HIST_ITEMS].values()
    assert len(items) < len(scoring[schema.HIST_ITEMS].values().unique())  # and not the rest of the histories
    for key in (schema.TARGET_ITEM, schema.TARGET_CATE):
        assert torch.equal(kept[key].values(), scoring[key].values())


def lemur_kept_and_reference(root, *overrides):
    """lemur's `kept_inputs` (what its dense arch reads) and `select` over the whole histories at
    the cosines its GSU ranked, with the sequence collection's calls (grad enabled?, KJT)."""
    model, batch = make_lemur(root, *overrides)
    seen, calls = {}, []
    positions = model.retrieval.cosine_positions
    model.retrieval.cosine_positions = lambda cosines: seen.update(cosines=cosines) or positions(cosines)
    model.dense.register_forward_pre_hook(lambda _, args: seen.update(kept=args[0]))
    model.sequence_tables.register_forward_hook(lambda _, args, __: calls.append((torch.is_grad_enabled(), args[0].to_dict())))
    model(batch)[0].backward()
    with torch.no_grad():
        reference = select(model.full_inputs(batch, seen["cosines"]), model.config)
    return model, batch, seen, reference, calls[:1]


@pytest.mark.parametrize("overrides", [[], ["model.lemur.keep_scl=true"]], ids=["representations", "keep_scl"])
def test_lemur_looks_up_only_what_it_keeps_and_reads_the_reference_inputs(synthetic_root, overrides):
    model, batch, seen, reference, calls = lemur_kept_and_reference(synthetic_root, *overrides)
    for field in reference._fields:
        assert torch.equal(getattr(seen["kept"], field), getattr(reference, field)), field
    ((grad_enabled, looked_up),) = calls  # one lookup, with gradient
    assert grad_enabled
    positions = model.retrieval.cosine_positions(seen["cosines"])
    for key in (schema.HIST_ITEMS, schema.HIST_CATES):
        rows = batch.sequence(key)
        read = torch.cat([gsu.gather_positions(rows, positions), rows[:, -SHORT:]], dim=1)
        assert torch.equal(looked_up[key].values(), read.unique()), key
    assert len(looked_up[schema.HIST_ITEMS].values()) < len(batch.sequence_features[schema.HIST_ITEMS].values().unique())
