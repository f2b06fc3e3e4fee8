"""lemur's warm start on 2 gloo ranks, row-wise sharded bank: every distinct item the training reads
is in the bank afterwards and equals the encoder's output, each rank encodes only the rows it
holds, a warm start killed after some chunks resumes without redoing them and ends with the bank
of an uninterrupted one, and a run resumed from a training checkpoint does not warm start again.
The scan of the train split is checked against the loader's own batches."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from muse_rec.batch import BatchLayout
from muse_rec.config import DataConfig, load_config
from muse_rec.data import schema
from muse_rec.data.feature_map import FeatureMaps
from muse_rec.data.layout import DatasetLayout
from muse_rec.data.loader import ShardDataset
from muse_rec.distributed.sharding import dense_module
from muse_rec.distributed.warm_start import DIRECTORY, META, items_read, warm_start_bank
from muse_rec.model.lemur import TargetEncoding
from muse_rec.model.memory_bank import missing
from muse_rec.train.loop import Runtime, build_model
from tests.gloo import gloo_group
from tests.distributed.test_memory_bank import read

WORLD = 2
CHUNK = 300
KILLED_AFTER = 2  # chunks each rank finishes before the simulated kill


def loader_items(root: Path, long_len: int, rank: int = 0, world: int = 1) -> set[int]:
    """The item rows the loader's batches hold (history and target), for one rank of `world`."""
    config = dataclasses.replace(DataConfig(), root=str(root), batch_size=64, long_seq_len=long_len, num_workers=0)
    maps = FeatureMaps.load(DatasetLayout(root), "p90")
    rows: set[int] = set()
    for batch in ShardDataset(config, "train", rank, world, maps, layout=BatchLayout(scl_features=(schema.SCL_TARGET,))):
        for key in (schema.HIST_ITEMS, schema.TARGET_ITEM):
            values = batch.sequence_features[key].values()
            rows |= set(values[values != 0].tolist())
    return rows


@pytest.mark.parametrize("long_len", [1000, 30])
def test_scan_finds_exactly_the_items_the_loader_reads(synthetic_root, long_len):
    maps = FeatureMaps.load(DatasetLayout(synthetic_root), "p90")
    items = maps.of_column(schema.TARGET_ITEM)
    whole = items_read(DatasetLayout(synthetic_root), items, long_len)
    assert set(np.flatnonzero(whole).tolist()) == loader_items(synthetic_root, long_len)
    halves = [items_read(DatasetLayout(synthetic_root), items, long_len, rank, WORLD) for rank in range(WORLD)]
    assert np.array_equal(halves[0] | halves[1], whole) and halves[0].sum() < whole.sum()


class Killed(Exception):
    pass


def lemur_config(root: str, out: str, *extra: str):
    return load_config(
        Path(__file__).resolve().parents[2] / "configs" / "lemur_synthetic.yaml",
        [f"data.root={root}", "data.batch_size=8", "data.num_workers=0", "model.keep_top=20", "model.lemur.width=16",
         "model.lemur.heads=2", "sharding.tables.bank.sharding_types=[row_wise]", f"train.out={out}",
         "model.lemur.warm_start=train_items", f"model.lemur.warm_start_chunk={CHUNK}", *extra],
    )


def bank_rows(model, rows: list[int]) -> torch.Tensor:
    return torch.cat([read(model, rows[i : i + 2000]) for i in range(0, len(rows), 2000)])


def count_encodes(model) -> list[int]:
    """Calls to the model's `encode_for_bank` from now on (one per chunk of the warm start)."""
    targets = next(m for m in model.modules() if isinstance(m, TargetEncoding))
    calls = []
    original = targets.encode_for_bank

    def counted(rows):
        calls.append(rows.numel())
        return original(rows)

    targets.encode_for_bank = counted
    return calls


def run(rank: int, root: str, init_file: str, tmp: str) -> None:
    with gloo_group(init_file, rank, WORLD):
        runtime = Runtime(rank, WORLD, torch.device("cpu"))
        maps = FeatureMaps.load(DatasetLayout(root), "p90")
        results = {}

        # an uninterrupted warm start
        config = lemur_config(root, f"{tmp}/whole")
        whole = build_model(config, maps, runtime)
        calls = count_encodes(whole.model)
        results["record"] = warm_start_bank(whole.model, config, maps, Path(config.train.out), 0, progress=False)
        results["encoded_here"] = sum(calls)
        targets = dense_module(whole.model).targets
        results["held"] = targets.writer.held_rows(torch.arange(targets.writer.held_count)).tolist()
        rows = sorted(loader_items(Path(root), config.data.long_seq_len, rank, WORLD))  # this rank's batches' items
        results["rows"] = rows
        results["bank"] = bank_rows(whole.model, rows)
        targets.encoder.eval()
        with torch.no_grad():  # the encoder as evaluation runs it (the centring's running mean)
            results["encoder"] = targets.encoder(targets.tokens[torch.tensor(rows)])
        targets.encoder.train()
        read_anywhere = set().union(*(loader_items(Path(root), config.data.long_seq_len, r, WORLD) for r in range(WORLD)))
        others = [r for r in range(1, maps.table_rows()[schema.ITEM_MAP]) if r not in read_anywhere][:500]
        results["unread_rows"] = others
        results["unread_bank"] = bank_rows(whole.model, others)

        # killed after KILLED_AFTER chunks (its progress saved after each), then restarted
        config = lemur_config(root, f"{tmp}/killed", "model.lemur.warm_start_save_every=1")
        killed = build_model(config, maps, runtime)
        calls = count_encodes(killed.model)
        original = dense_module(killed.model).targets.encode_for_bank

        def dies(rows):
            if len(calls) >= KILLED_AFTER:
                raise Killed
            return original(rows)

        dense_module(killed.model).targets.encode_for_bank = dies
        try:
            warm_start_bank(killed.model, config, maps, Path(config.train.out), 0, progress=False)
        except Killed:
            pass
        dist.barrier()
        results["saved_meta"] = json.loads((Path(config.train.out) / DIRECTORY / META).read_text())
        restarted = build_model(config, maps, runtime)
        calls = count_encodes(restarted.model)
        results["resumed_record"] = warm_start_bank(restarted.model, config, maps, Path(config.train.out), 0, progress=False)
        results["resumed_calls"] = len(calls)
        results["resumed_bank"] = bank_rows(restarted.model, rows)

        # restarted again once complete: nothing to encode; resumed from a training checkpoint: nothing at all
        again = build_model(config, maps, runtime)
        calls = count_encodes(again.model)
        warm_start_bank(again.model, config, maps, Path(config.train.out), 0, progress=False)
        results["complete_calls"] = len(calls)
        results["complete_bank"] = bank_rows(again.model, rows)
        results["after_checkpoint"] = warm_start_bank(again.model, config, maps, Path(config.train.out), 5, progress=False)
        results["directory_left"] = (Path(config.train.out) / DIRECTORY).exists()
        torch.save(results, f"{tmp}/result-{rank}.pt")


@pytest.fixture(scope="module")
def ranks(synthetic_root, tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("warm")
    mp.spawn(run, args=(str(synthetic_root), str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"result-{r}.pt", weights_only=False) for r in range(WORLD)]


def test_every_item_the_training_reads_is_in_the_bank_and_equals_the_encoder(ranks):
    for r in ranks:
        assert r["rows"] and not missing(r["bank"]).any()
        torch.testing.assert_close(r["bank"], r["encoder"], atol=1e-5, rtol=1e-4)
        assert missing(r["unread_bank"]).all()  # train_items: rows no train batch reads stay empty
    record = ranks[0]["record"]
    assert record["warm_start_items"] == len(set(ranks[0]["rows"]) | set(ranks[1]["rows"]))
    assert record["warm_start_encoded_now"] == record["warm_start_items"]


def test_each_rank_encodes_only_the_rows_it_holds(ranks):
    held = [set(r["held"]) for r in ranks]
    assert not held[0] & held[1]
    read = set(ranks[0]["rows"]) | set(ranks[1]["rows"])
    for r, mine in zip(ranks, held):
        assert r["encoded_here"] == len(read & mine)  # each distinct item once, by its owner


def test_a_killed_warm_start_resumes_after_its_last_saved_chunk(ranks):
    for r in ranks:
        assert r["saved_meta"]["done"] == KILLED_AFTER
        assert r["resumed_record"]["warm_start_resumed_after_chunk"] == KILLED_AFTER
        mine = len(set(r["held"]) & (set(ranks[0]["rows"]) | set(ranks[1]["rows"])))
        assert r["resumed_calls"] == -(-mine // CHUNK) - KILLED_AFTER  # finished chunks are not encoded again
        torch.testing.assert_close(r["resumed_bank"], r["bank"], atol=0, rtol=0)


def test_a_complete_warm_start_is_not_redone_and_a_resumed_run_skips_it(ranks):
    for r in ranks:
        assert r["complete_calls"] == 0
        torch.testing.assert_close(r["complete_bank"], r["bank"], atol=0, rtol=0)
        assert r["after_checkpoint"] == {} and not r["directory_left"]
