"""Each distinct history of a batch looked up once (`muse_rec.batch`) against the plain layout, one
history per impression (`per_impression_histories`): for every layout (the whole sequence, or at
gsu_stage loader the last S positions), the same dense inputs and loss bit for bit (the same table
rows are read), and the same gradients up to the order of float sums (a history's rows get the sum
over its impressions)."""
from __future__ import annotations

import itertools

import pytest
import torch

from muse_rec.batch import HISTORY_FEATURES, Batch, batch_layout, per_impression_histories
from muse_rec.config import load_config
from muse_rec.data.feature_map import FeatureMaps
from muse_rec.data.layout import DatasetLayout
from muse_rec.data.loader import ShardDataset
from muse_rec.distributed.table_weights import load_scl_table
from muse_rec.model.factory import make_model
from tests.model.test_lemur import make as make_lemur

RUNS = {
    **{method: [f"model.method={method}"] for method in ("muse", "sim_hard", "din")},  # gsu_stage loader: the short sequence per history
    "sim_soft": ["model.method=sim_soft"],  # gsu_stage loader: the loader's SCL cosines, (B, L)
    **{f"{method}_gsu_model": [f"model.method={method}", "model.gsu_stage=model"] for method in ("muse", "sim_soft", "sim_hard", "din")},
    "muse_int8_replicated": ["model.method=muse", "model.gsu_stage=model", "model.scl_storage=int8_replicated"],
}
LEMUR_RUNS = {
    "lemur_bank": [],
    "lemur_encoder_scl": ["model.lemur.history_source=encoder", "model.lemur.content_input=scl"],  # reads the SCL sequence
}


def gradients(model: torch.nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(batch)[0]
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(distinct: dict[str, torch.Tensor], plain: dict[str, torch.Tensor]) -> None:
    assert distinct.keys() == plain.keys()
    assert any("embeddings" in k and plain[k].abs().sum() > 0 for k in plain)  # the tables get gradient at all
    for key, expected in plain.items():
        torch.testing.assert_close(distinct[key], expected, msg=lambda m: f"{key}: {m}")


def assert_fewer_rows_looked_up(batch, plain) -> None:
    assert batch.num_histories < plain.num_histories == batch.batch_size
    for key in HISTORY_FEATURES:
        if key in batch.sequence_features.keys() or (batch.scl_features is not None and key in batch.scl_features.keys()):
            assert torch.equal(batch.sequence(key), plain.sequence(key)), key


@pytest.mark.parametrize("run", RUNS)
def test_distinct_histories_give_the_plain_inputs_loss_and_gradients(synthetic_root, run):
    config = load_config(None, [f"data.root={synthetic_root}", "data.batch_size=32", "model.keep_top=20", *RUNS[run]])
    maps = FeatureMaps.load(DatasetLayout(synthetic_root), "p90")
    torch.manual_seed(0)
    model = make_model(config.model, maps.table_rows())
    load_scl_table(model, maps.scl, torch.device("cpu"))
    for batch in itertools.islice(ShardDataset(config.data, "train", 0, 1, maps, layout=batch_layout(config.model)), 2):
        plain = per_impression_histories(batch)
        assert_fewer_rows_looked_up(batch, plain)
        distinct_inputs, plain_inputs = model.dense_inputs(batch), model.dense_inputs(plain)
        for field in plain_inputs._fields:
            assert torch.equal(getattr(distinct_inputs, field), getattr(plain_inputs, field)), field
        (distinct_loss, distinct), (plain_loss, reference) = gradients(model, batch), gradients(model, plain)
        assert torch.equal(distinct_loss, plain_loss)
        assert_same_gradients(distinct, reference)


@pytest.mark.parametrize("run", LEMUR_RUNS)
def test_lemur_reads_distinct_histories_like_plain_ones(synthetic_root, run):
    """lemur's bank and SCL lookups of the history are the same KJTs'; its draws restart per pass."""
    model, batch = make_lemur(synthetic_root, *LEMUR_RUNS[run])
    plain = per_impression_histories(batch)
    assert_fewer_rows_looked_up(batch, plain)
    results = []
    for b in (batch, plain):
        model.targets.steps.zero_()  # the same p / q draws (the bank gets the same writes before its reads)
        results.append(gradients(model, b))
    (distinct_loss, distinct), (plain_loss, reference) = results
    assert torch.equal(distinct_loss, plain_loss)
    assert_same_gradients(distinct, reference)


def test_per_impression_equals_index_select_bit_for_bit_with_a_strided_gradient():
    """`Batch.per_impression` makes the gradient contiguous before summing it per history (9x faster
    on CPU when the dense arch's concatenation hands back a strided slice): forward and the summed
    gradient are index_select's own, bit for bit, including heavy sharing of one history."""
    generator = torch.Generator().manual_seed(0)
    histories, length, dim = 7, 5, 4
    history_of_row = torch.tensor([0, 0, 0, 1, 2, 2, 3, 4, 4, 4, 4, 5, 6, 6])
    values = torch.randn(histories * length, dim, generator=generator)
    strided = (torch.randn(len(history_of_row), length, 2 * dim, generator=generator) * 1e3)[..., :dim]
    assert not strided.is_contiguous()
    batch = Batch(
        id_features=None, sequence_features=None, scl_features=None,
        labels=torch.zeros(len(history_of_row)), weights=torch.ones(len(history_of_row)), user_ids=torch.zeros(len(history_of_row), dtype=torch.long),
        top_cosines=torch.zeros(0), short_cosines=torch.zeros(0), history_of_row=history_of_row, num_histories=histories,
    )
    expanded, reference = values.clone().requires_grad_(), values.clone().requires_grad_()
    out = batch.per_impression(expanded, dim)
    plain = reference.view(histories, length, dim).index_select(0, history_of_row)
    assert torch.equal(out, plain)
    out.backward(strided)
    plain.backward(strided)
    assert torch.equal(expanded.grad, reference.grad)
