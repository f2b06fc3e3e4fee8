"""lemur on one process (no DMP): where gradients go, what evaluation runs, the encoder, the
contrastive loss, and the synthetic item content it reads."""
from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from muse_rec.config import LemurConfig, load_config
from muse_rec.data import schema
from muse_rec.data.content import load_content_tokens
from muse_rec.data.feature_map import FeatureMaps
from muse_rec.data.layout import DatasetLayout
from muse_rec.data.loader import ShardDataset
from muse_rec.distributed.table_weights import local_pieces
from muse_rec.model.encoder import ContentEncoder
from muse_rec.model.lemur import CooccurrenceContrastive, InBatchContrastive, LemurModel, TargetEncoding, known_mean
from muse_rec.model.memory_bank import bank_metrics, missing
from muse_rec.batch import batch_layout
from muse_rec.model.tower import tower_input_dim


def make(synthetic_root, *overrides: str) -> tuple[LemurModel, object]:
    config = load_config(
        None,
        [f"data.root={synthetic_root}", "data.batch_size=16", "data.num_workers=0", "model.method=lemur", "model.keep_top=20",
         "model.lemur.width=16", "model.lemur.heads=2", "model.lemur.bank_dtype=fp32", *overrides],
    )
    layout = DatasetLayout(synthetic_root)
    maps = FeatureMaps.load(layout, "p90")
    torch.manual_seed(0)
    model = LemurModel(config.model, maps.table_rows())
    model.targets.set_tokens(torch.from_numpy(load_content_tokens(layout, maps.of_column(schema.TARGET_ITEM), config.model.lemur.max_tokens)))
    model.targets.writer.bind(local_pieces(bank_weight(model)))
    model.targets.writer.clear()
    batch = next(iter(ShardDataset(config.data, "train", 0, 1, maps, layout=batch_layout(config.model))))
    return model, batch


def bank_weight(model: LemurModel) -> torch.Tensor:
    return model.bank_table.embeddings["bank"].weight


def encoder_grad_norm(model: LemurModel) -> float:
    return sum(float(p.grad.norm()) for p in model.targets.encoder.parameters() if p.grad is not None)


def written_rows(model: LemurModel) -> int:
    return int((bank_weight(model) != 0).any(dim=1).sum())


def test_gradient_reaches_the_encoder_through_encoded_targets(synthetic_root):
    model, batch = make(synthetic_root)
    model(batch)[0].backward()
    assert encoder_grad_norm(model) > 0
    assert bank_weight(model).grad is None  # bank reads are detached
    targets = batch.sequence_features[schema.TARGET_ITEM].values()
    assert written_rows(model) == len(torch.unique(targets[targets != 0]))


@pytest.mark.parametrize("shares", [("1.0", "0.0"), ("0.0", "0.0")], ids=["forward-only", "bank-only"])
def test_no_gradient_through_bank_reads_or_forward_only_targets(synthetic_root, shares):
    encode, backward = shares
    model, batch = make(synthetic_root, f"model.lemur.encode_share={encode}", f"model.lemur.backward_share={backward}")
    model(batch)[0].backward()  # a second step reads what the first wrote
    model.zero_grad(set_to_none=True)
    model(batch)[0].backward()
    assert encoder_grad_norm(model) == 0.0
    assert bank_weight(model).grad is None
    assert (written_rows(model) > 0) == (encode == "1.0")


@pytest.mark.parametrize("source", ["encoder", "bank"])
def test_evaluation_writes_nothing_and_bank_scoring_runs_no_encoder(synthetic_root, source):
    model, batch = make(synthetic_root, f"model.lemur.eval_target={source}")
    model(batch)  # training step: fills the bank
    before = bank_weight(model).detach().clone()
    calls = []
    model.targets.encoder.register_forward_hook(lambda *args: calls.append(1))
    model.eval()
    with torch.no_grad():
        _, (_, scores, *_rest) = model(batch)
    assert torch.equal(bank_weight(model), before)
    assert (len(calls) > 0) == (source == "encoder")
    assert torch.isfinite(scores).all()


def test_partial_shares_encode_each_distinct_item_once(synthetic_root):
    """p = 0.6, q = 0.3: the encoder sees every distinct encoded target exactly once, however the
    samples of one item split between the with- and without-gradient shares."""
    model, batch = make(synthetic_root, "data.batch_size=64", "model.lemur.encode_share=0.6", "model.lemur.backward_share=0.3")
    inputs, outputs = [], []
    model.targets.encoder.register_forward_hook(lambda module, args, out: inputs.append(args[0].shape[0]))
    model.targets.register_forward_hook(lambda module, args, out: outputs.append(out))
    model(batch)[0].backward()
    rows = batch.sequence_features[schema.TARGET_ITEM].values()
    encoded = outputs[0][1]
    assert sum(inputs) == len(torch.unique(rows[encoded]))
    assert written_rows(model) == len(torch.unique(rows[encoded]))
    assert 0 < int(encoded.sum()) < int((rows != 0).sum())  # both shares are drawn in this batch
    assert encoder_grad_norm(model) > 0


def test_share_draws_depend_on_seed_and_step_alone_so_resume_draws_the_same(synthetic_root):
    config = LemurConfig(width=16, heads=2, encode_share=0.5, backward_share=0.5)
    run = TargetEncoding(config)
    run.seed(5)
    draws = [run._draw(32) for _ in range(3)]
    assert "steps" in run.state_dict() and int(run.state_dict()["steps"]) == 3
    resumed = TargetEncoding(config)
    resumed.seed(5)
    resumed.load_state_dict({**run.state_dict(), "steps": torch.tensor(2)})
    assert torch.equal(resumed._draw(32), draws[2])
    assert not torch.equal(draws[0], draws[1])


def test_target_coverage_counts_targets_read_from_the_bank(synthetic_root):
    model, batch = make(synthetic_root, "model.lemur.encode_share=0.0", "model.lemur.backward_share=0.0")
    model(batch)
    assert bank_metrics(model.pop_bank_stats())["bank_coverage_target"] == 0.0  # an empty bank answers nothing
    model.config.lemur.encode_share = model.targets.config.encode_share = 1.0
    model(batch)  # writes every target
    model.pop_bank_stats()
    model.config.lemur.encode_share = model.targets.config.encode_share = 0.0
    model(batch)
    assert bank_metrics(model.pop_bank_stats())["bank_coverage_target"] == 1.0


def test_tower_reads_the_normalised_target_and_the_missing_flags():
    target = torch.tensor([[3.0, 4.0] + [0.0] * 126, [0.0] * 128])
    history = torch.zeros(2, 4, 128)
    history[0, 1:, 0] = 1.0  # row 0: positions 1..3 found, position 0 missing; row 1: all missing
    rows = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 9]])
    extra = LemurModel._missing_flags_and_target(target, missing(history), rows)
    torch.testing.assert_close(extra[:, :2], torch.tensor([[0.6, 0.8], [0.0, 0.0]]))
    torch.testing.assert_close(extra[:, 128:], torch.tensor([[0.0, 0.25], [1.0, 1.0]]))
    assert LemurModel.TOWER_EXTRA_INPUTS == extra.shape[1]


def test_history_from_the_encoder_gives_gradient_through_history(synthetic_root):
    """The cost baseline encodes every history item with gradient: with targets encoded forward
    only, the encoder trains through the history alone."""
    model, batch = make(synthetic_root, "model.lemur.history_source=encoder", "model.lemur.backward_share=0.0")
    model(batch)[0].backward()
    assert encoder_grad_norm(model) > 0


@pytest.mark.parametrize("source,content", [("bank", "tokens"), ("bank", "scl"), ("encoder", "tokens"), ("encoder", "scl")])
def test_the_scl_sequence_is_looked_up_only_where_the_history_needs_it(synthetic_root, source, content):
    model, batch = make(synthetic_root, f"model.lemur.history_source={source}", f"model.lemur.content_input={content}")
    features = model.scl_table.embedding_configs()[0].feature_names
    reads = source == "encoder" and content == "scl"  # the history encoded from its SCL vectors
    assert features == ([schema.SCL_TARGET, schema.SCL_LONG] if reads else [schema.SCL_TARGET])
    assert batch.scl_features.keys() == features
    model(batch)[0].backward()  # the batch fits the model either way


def test_encoder_masks_padding_and_rows_do_not_mix():
    config = LemurConfig(width=16, heads=2, max_tokens=6, vocab_size=50)
    encoder = ContentEncoder(config).eval()
    one = torch.tensor([[5, 6, 7, 0, 0, 0]])
    two = torch.tensor([[5, 6, 7, 0, 0, 0], [9, 9, 9, 9, 9, 9]])
    torch.testing.assert_close(encoder(one)[0], encoder(two)[0])
    assert encoder(two).shape == (2, 128)
    scl = ContentEncoder(LemurConfig(content_input="scl", scl_chunks=8, width=16, heads=2))
    assert scl(torch.randn(3, 128)).shape == (3, 128)


def test_centred_output_gives_no_loss_a_common_direction_to_grow():
    """Training: the batch's outputs have mean 0, so a loss of their sum sends no parameter any
    gradient (the output bias, shared by every item, in particular); evaluation subtracts the
    running mean instead; reset zeroes it."""
    torch.manual_seed(0)
    config = LemurConfig(width=16, heads=2, max_tokens=6, vocab_size=50)
    encoder = ContentEncoder(config)
    tokens = torch.randint(2, 50, (5, 6))
    out = encoder(tokens)
    torch.testing.assert_close(out.mean(dim=0), torch.zeros(128), atol=1e-6, rtol=0)
    (out.sum(dim=0) @ torch.randn(128)).backward()
    assert max(float(p.grad.abs().max()) for p in encoder.parameters() if p.grad is not None) < 1e-5
    (encoder(tokens) ** 2).sum().backward()  # a loss of the items' differences does train it
    assert float(encoder.out.weight.grad.abs().max()) > 1e-3
    running = encoder.centring.running_mean.clone()
    assert running.abs().max() > 0
    encoder.eval()
    centring, encoder.centring = encoder.centring, torch.nn.Identity()
    with torch.no_grad():
        raw = encoder(tokens)
        encoder.centring = centring
        torch.testing.assert_close(encoder(tokens), raw - running)
    encoder.reset_parameters()
    assert not encoder.centring.running_mean.any()
    with torch.no_grad():  # without it, the common part stays
        plain = ContentEncoder(dataclasses.replace(config, centre_output=False))
        assert float(plain(tokens).mean(dim=0).norm()) > 0.1


def test_no_cooccurrence_metrics_without_pairs(synthetic_root):
    model, batch = make(synthetic_root)
    model(batch)
    assert not any(key.startswith("cooccurrence") for key in bank_metrics(model.pop_bank_stats()))


def test_contrastive_masks_other_rows_of_the_same_user():
    torch.manual_seed(0)
    head = InBatchContrastive(user_dim=4, scale=5.0)
    user, target = torch.randn(4, 4), torch.randn(4, 128)
    history = torch.randn(4, 3, 128)
    labels = torch.tensor([1.0, 1.0, 1.0, 0.0])  # the unclicked row is no positive and no negative
    ids = torch.tensor([7, 7, 8, 8])
    loss = head(user, known_mean(history, missing(history)), target, labels, torch.ones(4), ids)
    u = F.normalize(head.user_tower(torch.cat([user, history.mean(1)], -1))[:3], dim=-1)
    t = F.normalize(target[:3], dim=-1)
    logits = 5.0 * u @ t.T
    logits[0, 1] = logits[1, 0] = float("-inf")  # rows 0 and 1 are the same user
    expected = F.cross_entropy(logits, torch.arange(3))
    torch.testing.assert_close(loss, expected)



def test_known_mean_pools_the_written_positions_only():
    history = torch.randn(3, 4, 128)
    absent = torch.tensor([[False, True, False, True], [True] * 4, [False] * 4])
    pooled = known_mean(history, absent)
    torch.testing.assert_close(pooled[0], history[0, [0, 2]].mean(0))
    assert torch.equal(pooled[1], torch.zeros(128))  # nothing written: zeros, not NaN
    torch.testing.assert_close(pooled[2], history[2].mean(0))

def test_cooccurrence_contrastive_masks_other_pairs_of_the_same_history():
    torch.manual_seed(0)
    values, history = torch.randn(4, 2, 128), torch.tensor([0, 0, 1, 2])
    z = F.normalize(values, dim=-1)
    logits = 5.0 * z[:, 0] @ z[:, 1].T
    logits[0, 1] = logits[1, 0] = float("-inf")  # pairs 0 and 1 come from one history
    none = torch.zeros(4, 0, 128)
    torch.testing.assert_close(CooccurrenceContrastive(5.0)(values, history, none), F.cross_entropy(logits, torch.arange(4)))


def test_cooccurrence_hard_negatives_join_each_anchors_logits_and_missing_ones_count_nothing():
    torch.manual_seed(0)
    values, history, negatives = torch.randn(3, 2, 128), torch.tensor([0, 1, 2]), torch.randn(3, 2, 128)
    negatives[1, 1] = 0.0  # a never-written bank row (or no negative found): left out
    z, n = F.normalize(values, dim=-1), F.normalize(negatives, dim=-1)
    hard = 5.0 * torch.einsum("pd,pnd->pn", z[:, 0], n)
    hard[1, 1] = float("-inf")
    logits = torch.cat([5.0 * z[:, 0] @ z[:, 1].T, hard], dim=1)
    got = CooccurrenceContrastive(5.0)(values, history, negatives)
    torch.testing.assert_close(got, F.cross_entropy(logits, torch.arange(3)))
    assert got > CooccurrenceContrastive(5.0)(values, history, negatives[:, :0])  # more negatives: a harder task


def test_cooccurrence_pairs_alone_train_the_encoder(synthetic_root):
    only_pairs = ["model.lemur.ranking_weight=0", "model.lemur.contrastive_weight=0", "model.lemur.cooccurrence_weight=1",
                  "model.lemur.cooccurrence_min_cosine=0.3"]
    model, batch = make(synthetic_root, *only_pairs)
    assert len(batch.cooccurrence) > 0
    model.pop_bank_stats()
    loss = model(batch)[0]
    assert loss > 0
    logged = bank_metrics(model.pop_bank_stats())  # what metrics.jsonl reports
    assert logged["cooccurrence_loss"] == pytest.approx(float(loss)) and logged["cooccurrence_pairs"] == len(batch.cooccurrence)
    loss.backward()
    assert encoder_grad_norm(model) > 0  # the other losses weigh 0: the pairs alone
    model.zero_grad()
    empty = dataclasses.replace(batch, cooccurrence=batch.cooccurrence[:0])
    loss = model(empty)[0]
    loss.backward()  # no pair: a zero loss with the encoder still in the graph (DDP)
    assert float(loss.detach()) == 0 and all(p.grad is not None for p in model.targets.encoder.parameters())


def test_synthetic_titles_name_the_true_cluster(synthetic_root):
    from muse_rec.config import SynthConfig
    from muse_rec.data.synth import Catalogue, raw_ids
    from tests.conftest import SMALL_SYNTH

    table = pq.read_table(DatasetLayout(synthetic_root).item_content_path)
    assert table.schema == schema.CONTENT_SCHEMA
    ids = table.column(schema.TARGET_ITEM).to_numpy()
    assert (np.diff(ids) > 0).all() and len(ids) == SMALL_SYNTH.items
    catalogue = Catalogue.build(SMALL_SYNTH)
    internal = {int(r): i for i, r in enumerate(raw_ids(schema.ITEM_MAP, np.arange(SMALL_SYNTH.items)))}
    titles = table.column(schema.TITLE_TOKENS).to_pylist()
    for raw, title in list(zip(ids, titles))[:200]:
        item = np.array([internal[int(raw)]])
        assert len(title) == SynthConfig().title_tokens
        assert int(catalogue.keyword(0, catalogue.cluster_of(item))[0]) in title
        assert int(catalogue.keyword(1, catalogue.category_of(item))[0]) in title


def captured_writes(model: LemurModel) -> list[tuple]:
    """The arguments of every `BankWriter.forward` call from now on, and the centring's running mean then."""
    calls = []
    centring = model.targets.encoder.centring
    model.targets.writer.register_forward_pre_hook(lambda module, args: calls.append((*args, centring.running_mean.clone())))
    return calls


def encoded_with(model: LemurModel, rows: torch.Tensor, running_mean: torch.Tensor) -> torch.Tensor:
    """`encode_for_bank` with the centring's running mean as it was (it moves at the end of each step)."""
    now = model.targets.encoder.centring.running_mean.clone()
    model.targets.encoder.centring.running_mean.copy_(running_mean)
    try:
        return model.targets.encode_for_bank(rows)
    finally:
        model.targets.encoder.centring.running_mean.copy_(now)


def test_most_read_refresh_rewrites_a_bounded_number_of_the_rows_the_batch_reads_most(synthetic_root):
    model, batch = make(synthetic_root, "data.batch_size=64", "model.lemur.refresh_rows=40", "model.lemur.refresh_policy=most_read")
    model.targets.calibrate_centring(torch.arange(1, 200))  # as the warm start does: a reference before step one
    calls = captured_writes(model)
    model(batch)[0].backward()
    (target_rows, _, refresh_rows, refresh_values, running_mean), = calls
    assert 0 < refresh_rows.numel() <= 40
    history = batch.sequence(schema.HIST_ITEMS).reshape(-1)  # the reads of every impression, not of each distinct history
    rows, counts = torch.unique(history[history != 0], return_counts=True)
    candidates = ~torch.isin(rows, target_rows)  # this step's targets are fresh already
    least_chosen = counts[torch.isin(rows, refresh_rows)].min()
    assert (counts[candidates & ~torch.isin(rows, refresh_rows)] <= least_chosen).all()  # none left out was read more
    assert not torch.isin(refresh_rows, target_rows).any()
    torch.testing.assert_close(refresh_values, encoded_with(model, refresh_rows, running_mean))
    torch.testing.assert_close(bank_weight(model)[refresh_rows].detach(), refresh_values)  # written before the read
    stats = bank_metrics(model.pop_bank_stats())
    assert stats["bank_refreshed_rows"] == 0  # nothing was in the bank yet: they are new rows, not refreshes


def test_oldest_refresh_sweeps_the_held_rows_in_turn_and_leaves_missing_rows_missing(synthetic_root):
    model, batch = make(synthetic_root, "model.lemur.refresh_rows=25", "model.lemur.refresh_policy=oldest")
    writer = model.targets.writer
    held = writer.held_rows(torch.arange(writer.held_count))
    with torch.no_grad():  # rows 1..60 already in the bank; the rest missing
        bank_weight(model)[1:61] = 1.0
    swept, means = [], []
    store = writer.store_local
    centring = model.targets.encoder.centring
    writer.store_local = lambda rows, values, only_written: (
        swept.append(rows.clone()), means.append(centring.running_mean.clone()), store(rows, values, only_written))
    for _ in range(3):
        model(batch)[0].backward()
    assert [s.tolist() for s in swept] == [held[i * 25 : (i + 1) * 25].tolist() for i in range(3)]  # 25 a step, in turn
    targets = set(batch.sequence_features[schema.TARGET_ITEM].values().tolist())
    weight = bank_weight(model).detach()
    for row in torch.cat(swept).tolist():
        assert bool(weight[row].any()) == (1 <= row <= 60 or row in targets)  # a never-written row stays missing
    rows = torch.arange(50, 61)  # swept last, after this step's target writes: the encoder as it is now
    torch.testing.assert_close(weight[rows], encoded_with(model, rows, means[-1]))
    assert bank_metrics(model.pop_bank_stats())["bank_refreshed_rows"] == len(set(range(1, 61)) | (targets & set(range(1, 75))))


def test_whole_bank_reencode_rewrites_every_written_held_row_with_the_current_encoder(synthetic_root):
    model, batch = make(synthetic_root, "model.lemur.warm_start_chunk=37")  # chunks that do not divide the rows held
    model.targets.calibrate_centring(torch.arange(1, 200))
    with torch.no_grad():  # rows 1..80 in the bank with values no encoder gives; the rest missing
        bank_weight(model)[1:81] = torch.randn(80, 128)
    cached = bank_weight(model).detach().clone()
    model.pop_bank_stats()
    staleness = model.targets.reencode_held()
    weight = bank_weight(model).detach()
    rows = torch.arange(1, 81)
    fresh = model.targets.encode_for_bank(rows)
    torch.testing.assert_close(weight[rows], fresh)  # every written row: the current encoder's value
    assert not weight[81:].any() and not weight[0].any()  # a never-written row stays missing
    assert staleness[1] == 80
    cosines = F.cosine_similarity(fresh, cached[rows], dim=-1)  # float32 values of magnitude <= 1, summed in another order
    torch.testing.assert_close(staleness[0], cosines.double().sum(), rtol=0, atol=rows.numel() * torch.finfo(torch.float32).eps)
    assert not model.pop_bank_stats().any()  # counted apart from the targets' and the refresh's statistics
    with torch.no_grad():  # the encoder moves: the next re-encode follows it
        for p in model.targets.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    staleness = model.targets.reencode_held()
    torch.testing.assert_close(bank_weight(model).detach()[rows], model.targets.encode_for_bank(rows))
    assert staleness[0] / staleness[1] < 1


def test_draws_need_no_host_read_of_the_step(synthetic_root):
    """The p / q draws are computed from the step counter on its device: a step count that cannot be
    read on the host (a meta tensor) still draws."""
    from muse_rec.model.lemur import step_uniforms

    draws = step_uniforms(3, torch.tensor(5), 1000)
    assert draws.min() >= 0 and draws.max() < 1 and abs(float(draws.mean()) - 0.5) < 0.05
    assert torch.equal(step_uniforms(3, torch.tensor(5), 1000), draws) and not torch.equal(step_uniforms(3, torch.tensor(6), 1000), draws)
    assert step_uniforms(3, torch.tensor(5, device="meta"), 10).device.type == "meta"


def test_a_frozen_encoder_runs_as_in_evaluation_while_the_model_trains(synthetic_root):
    model, batch = make(synthetic_root, "model.lemur.train_encoder=false")
    model.train()
    assert model.training and not model.targets.encoder.training
    model.eval()
    model.train()
    assert not model.targets.encoder.training
    before = {k: v.clone() for k, v in model.targets.encoder.state_dict().items()}
    model(batch)[0].backward()
    assert all(torch.equal(before[k], v) for k, v in model.targets.encoder.state_dict().items())  # running mean too


def test_sorted_similarities_are_the_largest_cosines_and_train_the_encoder(synthetic_root):
    from muse_rec.model.lemur import SortedSimilarities

    target, history = torch.randn(3, 128, requires_grad=True), torch.randn(3, 7, 128)
    history[0, 2] = 0.0  # a missing item: cosine 0
    top = SortedSimilarities(4)(target, F.normalize(history, dim=-1))
    cosines = F.cosine_similarity(target.detach().unsqueeze(1), history, dim=-1)
    cosines[0, 2] = 0.0
    torch.testing.assert_close(top, cosines.sort(dim=1, descending=True).values[:, :4])
    model, batch = make(synthetic_root, "model.lemur.sorted_similarities=20", "model.lemur.contrastive_weight=0")
    model(batch)  # fills the bank, so the second step's history has something to compare with
    model.zero_grad(set_to_none=True)
    model(batch)[0].backward()
    assert encoder_grad_norm(model) > 0
    model, batch = make(synthetic_root, "model.lemur.ranker_gradient=false", "model.lemur.contrastive_weight=0")
    model(batch)[0].backward()
    assert encoder_grad_norm(model) == 0.0  # the stop-gradient ablation: no path from the ranking loss


def test_scl_content_source_reads_the_vectors_the_scl_table_holds(synthetic_root):
    """content_input=scl: the warm start and the refresh encode an item from the values file's
    vector, the one the SCL table gives the same item as a target."""
    from muse_rec.distributed.table_weights import load_scl_table
    from muse_rec.distributed.warm_start import scl_content_source

    model, batch = make(synthetic_root, "model.lemur.content_input=scl", "model.lemur.refresh_rows=20")
    maps = FeatureMaps.load(DatasetLayout(synthetic_root), "p90")
    load_scl_table(model, maps.scl, torch.device("cpu"))
    model.targets.set_content_source(scl_content_source(maps))
    rows = batch.sequence_features[schema.TARGET_ITEM].values()
    looked_up, _ = model.scl_vectors(batch)
    torch.testing.assert_close(model.targets._content(rows), looked_up)
    assert looked_up[rows != 0].abs().sum(dim=1).gt(0).any()
    model(batch)[0].backward()  # the refresh encodes history items from the same source


def test_soft_simtier_is_the_histogram_at_bin_centres_and_passes_gradient():
    from muse_rec.model.esu import SimTier
    from muse_rec.model.lemur import SoftSimTier

    torch.manual_seed(0)
    hard, soft = SimTier(), SoftSimTier()
    soft.weight.data.copy_(hard.weight.data)
    centres = torch.tensor([[0.25, -0.55, 0.95, 0.05, 0.05, -0.95]], requires_grad=True)  # the middle of hard bins
    torch.testing.assert_close(soft(centres), hard(centres.detach()))
    mask = torch.tensor([[True, True, False, True, False, True]])
    torch.testing.assert_close(soft(centres, mask), hard(centres.detach(), mask))
    between = torch.tensor([[0.3]])  # a bin edge: half in each neighbour
    counts = torch.exp(soft(between) / soft.weight) - 1
    torch.testing.assert_close(counts[0, 13:15], torch.tensor([0.5, 0.5]))
    soft(centres).sum().backward()
    assert centres.grad.abs().sum() > 0


def test_history_attention_equals_projecting_every_item_and_trains_the_encoder(synthetic_root):
    from muse_rec.model.lemur import HistoryAttention

    torch.manual_seed(0)
    attention = HistoryAttention(32)
    target, history = torch.randn(3, 128), torch.randn(3, 9, 128)
    present = torch.rand(3, 9) > 0.3
    present[2] = False
    t, h = F.normalize(target, dim=-1), F.normalize(history, dim=-1)
    keys, values = attention.key(h), h @ attention.value.weight.T  # every item projected: the plain form
    scores = torch.einsum("bld,bd->bl", keys, attention.query(t)) / 128 ** 0.5
    weights = F.softmax(scores.masked_fill(~present, float("-inf")), dim=-1).nan_to_num(0.0)
    expected = torch.einsum("bl,bld->bd", weights, values) + attention.value.bias
    torch.testing.assert_close(attention(target, h, present), expected)
    ranker_only = ["model.lemur.keep_scl=true", "model.lemur.contrastive_weight=0", "model.lemur.tower_reads_target=false"]
    for attends in (True, False):
        model, batch = make(synthetic_root, *ranker_only, f"model.lemur.history_attention={str(attends).lower()}")
        assert model.dense.tower.layers[0].in_features == tower_input_dim(model.config.embedding_dim) + 2 + 32 * attends + 22
        model(batch)  # fills the bank, so the second step's history has something to attend to
        model.zero_grad(set_to_none=True)
        model(batch)[0].backward()
        assert (encoder_grad_norm(model) > 0) == attends  # the ranking loss alone, through the target's query


def test_the_tower_can_leave_the_target_representation_out(synthetic_root):
    model, batch = make(synthetic_root, "model.lemur.tower_reads_target=false", "model.lemur.sorted_similarities=5")
    assert model.dense.tower.layers[0].in_features == tower_input_dim(model.config.embedding_dim) + 2 + 5
    model(batch)[0].backward()


def test_keep_scl_runs_muses_gsu_on_the_loaders_scl_cosines_beside_the_representations(synthetic_root):
    """keep_scl: the batch carries the SCL cosines of the target with all L positions (the ones the
    SCL table's vectors give), the GSU selects on them, and the representations reach the tower
    beside them: the target's and a SimTier histogram of its cosines to the non-padding history."""
    from muse_rec.distributed.table_weights import load_scl_table
    from muse_rec.model import gsu

    model, batch = make(synthetic_root, "model.lemur.keep_scl=true")
    reader, same_rows = make(synthetic_root, "model.lemur.history_source=encoder", "model.lemur.content_input=scl")  # reads the SCL sequence
    load_scl_table(reader, FeatureMaps.load(DatasetLayout(synthetic_root), "p90").scl, torch.device("cpu"))
    expected = gsu.scl_cosines(*reader.scl_vectors(same_rows))
    assert batch.top_cosines.shape == expected.shape and expected.shape[1] > model.config.keep_top  # all L positions
    assert torch.equal(batch.top_cosines, expected) and expected.abs().sum() > 0
    assert batch.scl_features.keys() == [schema.SCL_TARGET]  # no 1000 x 128 SCL lookup

    seen = {}
    positions = model.retrieval.cosine_positions
    model.retrieval.cosine_positions = lambda cosines: seen.update(gsu=cosines) or positions(cosines)
    model.representation_simtier.register_forward_hook(lambda module, args, out: seen.update(simtier=args, features=out))
    model(batch)[0].backward()
    assert torch.equal(seen["gsu"], batch.top_cosines)
    cosines, present = seen["simtier"]
    rows = batch.per_impression(batch.sequence_features[schema.HIST_ITEMS].values())
    assert torch.equal(present, rows != 0) and not torch.equal(cosines, batch.top_cosines)
    assert seen["features"].shape == (batch.batch_size, model.representation_simtier.bins)
    extra = LemurModel.TOWER_EXTRA_INPUTS + model.representation_simtier.bins
    assert model.dense.tower.layers[0].in_features == tower_input_dim(model.config.embedding_dim) + extra
    assert encoder_grad_norm(model) > 0
