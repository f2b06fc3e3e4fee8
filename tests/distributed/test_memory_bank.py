"""lemur's memory bank on 2 gloo ranks, row-wise sharded: writes from either rank land on the rank
that owns the row and are read back on both, duplicates keep the last value, never-written rows
read as zeros (missing), staleness is the cosine to the replaced value, the bank survives a
checkpoint, and the traced training pipeline writes and reads it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from muse_rec.batch import SEQUENCE_FEATURES, batch_layout
from muse_rec.config import load_config
from muse_rec.data import schema
from muse_rec.data.feature_map import FeatureMaps
from muse_rec.data.layout import DatasetLayout
from muse_rec.data.loader import ShardDataset
from muse_rec.distributed.memory_bank import gather_bank_metrics
from muse_rec.distributed.sharding import dense_module
from muse_rec.model.memory_bank import BankWriter, missing
from muse_rec.train import checkpoint
from muse_rec.train.loop import Runtime, build_model
from muse_rec.train.pipeline import train_pipeline
from tests.gloo import gloo_group

WORLD = 2


def read(model, rows: list[int]) -> torch.Tensor:
    """Bank rows through the sharded table's own lookup (all-to-all), as the model reads them: from
    a KJT laid out like `Batch.sequence_features` (a sharded module keeps its first input's key layout)."""
    ids = torch.tensor(rows, dtype=torch.long)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=list(SEQUENCE_FEATURES),
        values=torch.cat([ids, torch.zeros_like(ids), ids, torch.zeros_like(ids)]),
        lengths=torch.full((len(SEQUENCE_FEATURES),), len(rows)),
    )
    return dense_module(model).bank_table(kjt)[schema.HIST_ITEMS].values().detach().float().clone()


def run(rank: int, root: str, init_file: str, out: str) -> None:
    with gloo_group(init_file, rank, WORLD):
        config = load_config(
            Path(__file__).resolve().parents[2] / "configs" / "lemur_synthetic.yaml",
            [f"data.root={root}", "data.batch_size=8", "data.num_workers=0", "model.keep_top=20", "model.lemur.width=16",
             "model.lemur.heads=2", "sharding.tables.bank.sharding_types=[row_wise]", f"train.out={out}-run"],
        )
        maps = FeatureMaps.load(DatasetLayout(root), "p90")
        runtime = Runtime(rank, WORLD, torch.device("cpu"))
        sharded = build_model(config, maps, runtime)
        writer = next(m for m in sharded.model.modules() if isinstance(m, BankWriter))
        rows = maps.table_rows()[schema.ITEM_MAP]
        owned_by_0, owned_by_1, never = 2, rows - 3, 5  # row-wise: rank 0 holds the first half
        generator = torch.Generator().manual_seed(0)
        a, b, c, d, e = torch.randn(5, schema.SCL_DIM, generator=generator)
        results = {"pieces": [(first, piece.shape[0]) for first, _, piece in writer.pieces]}

        # rank 0 writes a row of its own twice (the last value wins) and a row rank 1 holds; rank 1 writes one
        if rank == 0:
            writer(torch.tensor([owned_by_0, owned_by_1, owned_by_0]), torch.stack([a, b, c]))
        else:
            writer(torch.tensor([rows - 2]), d.unsqueeze(0))
        looked_up = [owned_by_0, owned_by_1, rows - 2, never]
        results["after_first_write"] = read(sharded.model, looked_up)
        results["first_metrics"] = gather_bank_metrics(sharded.model)
        # rank 1 overwrites rank 0's row: staleness is the cosine between the old and the new value
        writes = 1 if rank == 1 else 0  # a collective: rank 0 takes part with nothing to write
        writer(torch.tensor([owned_by_0] * writes, dtype=torch.long), e.unsqueeze(0)[:writes])
        results["second_metrics"] = gather_bank_metrics(sharded.model)
        results["expected_staleness"] = float(F.cosine_similarity(c, e, dim=0))
        results["after_second_write"] = read(sharded.model, looked_up)

        with torch.no_grad():  # an encoder unlike the seeded init, to be found again below
            for tensor in dense_module(sharded.model).targets.encoder.state_dict().values():  # the centring's running mean too
                tensor.add_(0.5)
        # checkpoint round trip into a fresh model (its bank starts empty)
        dense_module(sharded.model).targets.steps.fill_(7)  # p / q draws resume at the saved step
        path = checkpoint.save(Path(out + "-run"), sharded, checkpoint.Position(0, WORLD, 8, 0), checkpoint.run_identity(config, maps.table_rows()), {}, keep=1)
        fresh = build_model(config, maps, runtime)
        results["fresh"] = read(fresh.model, looked_up)
        initial_encoder = {k: v.clone() for k, v in dense_module(fresh.model).targets.encoder.state_dict().items()}
        checkpoint.load(path, fresh, with_optimizer=False)
        results["reloaded"] = read(fresh.model, looked_up)
        results["reloaded_steps"] = int(dense_module(fresh.model).targets.steps)

        # the encoder alone into a model built with encoder_checkpoint (the two-stage variant)
        with_encoder = dataclasses.replace(config, model=dataclasses.replace(
            config.model, lemur=dataclasses.replace(config.model.lemur, encoder_checkpoint=str(path), train_encoder=False)))
        second_stage = build_model(with_encoder, maps, runtime)
        saved = dense_module(sharded.model).targets.encoder.state_dict()
        loaded = dense_module(second_stage.model).targets.encoder.state_dict()
        results["encoder_loaded"] = all(torch.equal(saved[k], loaded[k]) for k in saved)
        results["encoder_was_random"] = not any(torch.equal(saved[k], initial_encoder[k]) for k in saved)

        # the training pipeline: targets encoded and written, then read back
        pipeline = train_pipeline(fresh.model, fresh.optimizer, torch.device("cpu"), config.model)
        batches = iter(ShardDataset(config.data, "train", rank, WORLD, maps, layout=batch_layout(config.model)))  # lemur, history from the bank
        results["losses"] = [float(pipeline.progress(batches)[0]) for _ in range(3)]
        pipeline.detach()
        results["train_metrics"] = gather_bank_metrics(fresh.model)
        if rank == 0:
            results["rows"] = [owned_by_0, owned_by_1, rows - 2, never]
            results["values"] = {"a": a, "b": b, "c": c, "d": d, "e": e}
        torch.save(results, f"{out}-{rank}.pt")


@pytest.fixture(scope="module")
def ranks(synthetic_root, tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("bank")
    out = str(tmp / "result")
    mp.spawn(run, args=(str(synthetic_root), str(tmp / "init"), out), nprocs=WORLD, join=True)
    return [torch.load(f"{out}-{r}.pt", weights_only=False) for r in range(WORLD)]


def test_bank_is_row_wise_sharded_over_both_ranks(ranks):
    (first0, rows0), = ranks[0]["pieces"]
    (first1, rows1), = ranks[1]["pieces"]
    assert first0 == 0 and first1 == rows0 and rows1 > 0


def test_writes_from_either_rank_are_read_on_both(ranks):
    v = ranks[0]["values"]
    expected = torch.stack([v["c"], v["b"], v["d"], torch.zeros(schema.SCL_DIM)])  # duplicate: last value
    for r in ranks:
        torch.testing.assert_close(r["after_first_write"], expected)
        assert missing(r["after_first_write"]).tolist() == [False, False, False, True]


def test_overwrite_from_the_other_rank_and_staleness(ranks):
    v = ranks[0]["values"]
    for r in ranks:
        torch.testing.assert_close(r["after_second_write"][0], v["e"])
        assert r["first_metrics"]["bank_coverage_target"] == 0.0  # three fresh rows, none known before
        assert r["second_metrics"]["bank_coverage_target"] == 1.0
        assert r["second_metrics"]["bank_staleness_cosine"] == pytest.approx(r["expected_staleness"], abs=1e-6)


def test_bank_survives_a_checkpoint(ranks):
    for r in ranks:
        assert not r["fresh"].any()
        torch.testing.assert_close(r["reloaded"], r["after_second_write"])
        assert r["reloaded_steps"] == 7  # and the step the p / q draws resume from


def test_encoder_checkpoint_loads_only_the_encoder(ranks):
    for r in ranks:
        assert r["encoder_was_random"] and r["encoder_loaded"]


def test_training_pipeline_writes_then_reads_the_bank(ranks):
    for r in ranks:
        assert all(torch.isfinite(torch.tensor(r["losses"])))
        m = r["train_metrics"]
        assert m["bank_coverage_long"] > 0.0 and m["bank_coverage_short"] is not None
    assert ranks[0]["train_metrics"] == ranks[1]["train_metrics"]  # summed over ranks
