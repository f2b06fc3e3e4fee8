"""lemur trained by `muse-rec train` on 2 gloo ranks (torchrun), as benchmarks/lemur.py runs it:

- the fair two-stage arm: an encoder pretrained on the contrastive loss alone, then frozen: every
  item of the item table encoded once into the bank by that encoder (100 % coverage), nothing
  written during training, the encoder's weights untouched, and the bank at the end equal to the
  frozen encoder's output for every item;
- end to end with the warm start and the most-read refresh: the warm start's cost is logged in
  metrics.jsonl, coverage stays at 1, and a run resumed from a mid-epoch checkpoint ends with
  exactly the weights and bank of the uninterrupted run (the p / q draws, the refresh, the
  co-occurrence pairs and the encoder's centring follow the checkpointed state or the batch, the
  same on every rank);
- the whole-bank re-encode (reencode_every, reencode_before_eval): logged at the steps it runs,
  and the final checkpoint's bank is the final encoder's value of every written item.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from muse_rec.config import SynthConfig, load_config
from muse_rec.data import schema
from muse_rec.data.content import load_content_tokens
from muse_rec.data.feature_map import FeatureMaps
from muse_rec.data.layout import DatasetLayout
from muse_rec.data.synth import synthesize
from muse_rec.model.encoder import ContentEncoder
from muse_rec.train.checkpoint import checkpoint_root, latest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "lemur_synthetic.yaml"
ENCODER = "targets.encoder."
BANK = "bank_table.embeddings.bank.weight"
SMALL = ["data.batch_size=12", "data.num_workers=0", "data.long_seq_len=200", "model.keep_top=20", "model.lemur.width=16",
         "model.lemur.heads=2", "model.lemur.sorted_similarities=10", "model.lemur.warm_start_chunk=500",
         "train.log_every=2", "train.eval_batch_size=64", "train.eval_gauc_se_draws=100"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    synthesize(SynthConfig(seed=3, train_users=60, test_users=20, items=3000, categories=10, row_group_rows=100), root, progress=False)
    return root


def train(data: Path, out: Path, *extra: str) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "muse_rec.cli",
               "train", "--quiet", "--config", str(CONFIG), f"data.root={data}", f"train.out={out}", *SMALL, *extra]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_state(run: Path) -> dict[str, torch.Tensor]:
    flat = run / "final.pt"
    dcp_to_torch_save(latest(run), flat)
    return torch.load(flat, weights_only=False)["model"]


def encoder_of(state: dict, data: Path) -> ContentEncoder:
    encoder = ContentEncoder(load_config(CONFIG, SMALL).model.lemur).eval()
    encoder.load_state_dict({k[k.index(ENCODER) + len(ENCODER):]: v for k, v in state.items() if ENCODER in k})
    return encoder


@pytest.fixture(scope="module")
def two_stage(data, tmp_path_factory) -> tuple[dict, dict, list[dict]]:
    pretrain = tmp_path_factory.mktemp("pretrain")
    train(data, pretrain, "model.lemur.ranking_weight=0", "model.lemur.contrastive_weight=1")
    frozen = tmp_path_factory.mktemp("two_stage")
    records = train(data, frozen, "model.lemur.train_encoder=false", f"model.lemur.encoder_checkpoint={latest(pretrain)}",
                    "model.lemur.warm_start=all_items", "model.lemur.encode_share=0", "model.lemur.backward_share=0",
                    "model.lemur.refresh_rows=0")
    return final_state(pretrain), final_state(frozen), records


def test_two_stage_encodes_every_item_once_with_the_pretrained_encoder_and_keeps_it_frozen(two_stage, data):
    pretrained, frozen, records = two_stage
    items = FeatureMaps.load(DatasetLayout(data), "p90").of_column(schema.TARGET_ITEM)
    warm = records[0]
    assert warm["warm_start_items"] == items.num_rows - 1 and warm["warm_start_item_table_share"] == 1.0
    for key, value in pretrained.items():
        if ENCODER in key:
            assert torch.equal(frozen[key], value), key  # frozen: not one weight (nor the centring) moved
    tokens = torch.from_numpy(load_content_tokens(DatasetLayout(data), items, 8))
    with torch.no_grad():
        expected = encoder_of(frozen, data)(tokens[1:])
    torch.testing.assert_close(frozen[BANK][1:], expected, atol=1e-5, rtol=1e-4)  # every item, the encoder's value


def test_two_stage_reads_every_target_and_history_item_from_the_bank(two_stage):
    *_, records = two_stage
    trained = [r for r in records if "loss" in r]
    assert trained
    for record in trained:
        assert record["bank_coverage_target"] == 1.0 and record["bank_coverage_short"] == 1.0 and record["bank_coverage_long"] == 1.0
        assert record["bank_staleness_cosine"] is None  # p = 0: no target is encoded, nothing is written
    assert np.isfinite(records[-1]["gauc"]) and records[-1]["gauc_bootstrap_se"] > 0


def test_end_to_end_run_with_warm_start_and_refresh_resumes_exactly(data, tmp_path):
    refresh = ["model.lemur.refresh_rows=30", "model.lemur.refresh_policy=most_read", "train.checkpoint_every=2", "train.keep_checkpoints=10",
               "model.lemur.cooccurrence_weight=1"]  # the loader's pairs follow the batch alone
    whole = tmp_path / "whole"
    records = train(data, whole, *refresh)
    warm = records[0]
    assert warm["warm_start_items"] > 0 and warm["warm_start_encoded_now"] == warm["warm_start_items"]
    assert warm["warm_start_items_per_second"] > 0 and warm["warm_start_encode_seconds"] >= 0
    trained = [r for r in records if "loss" in r]
    assert all(r["bank_coverage_long"] == 1.0 and r["bank_coverage_short"] == 1.0 for r in trained)
    assert all(0 < r["bank_refreshed_rows"] <= 30 * 2 * 2 for r in trained)  # 30 a rank a step, 2 steps a record
    assert all(r["cooccurrence_loss"] > 0 and r["cooccurrence_pairs"] > 0 for r in trained)
    assert not any("cooccurrence_loss" in r for r in records if r.get("split") == "test")  # evaluation draws no pair
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    root = checkpoint_root(resumed)
    steps = sorted(root.glob("step-*"))
    assert len(steps) >= 3
    for later in steps[1:]:  # as if killed after the first checkpoint
        shutil.rmtree(later)
    (root / "latest").unlink()
    (resumed / "metrics.jsonl").unlink()
    records = train(data, resumed, *refresh)
    assert not any("warm_start_items" in r for r in records)  # the bank came from the checkpoint
    expected, found = final_state(whole), final_state(resumed)
    assert expected.keys() == found.keys()
    for key in expected:
        torch.testing.assert_close(found[key], expected[key], atol=0, rtol=0, msg=key)


def test_whole_bank_reencode_every_n_steps_and_before_evaluation(data, tmp_path):
    run = tmp_path / "reencode"
    records = train(data, run, "model.lemur.refresh_rows=0", "model.lemur.reencode_every=2", "model.lemur.reencode_before_eval=true",
                    "optim.encoder_lr=0.01")  # a fast encoder: the bank would go stale between the re-encodes
    steps = records[-1]["step"]
    reencodes = [r for r in records if "bank_reencoded_rows" in r]
    expected = sorted(set(range(2, steps + 1, 2)) | {steps})
    assert [r["step"] for r in reencodes] == expected
    warm = records[0]["warm_start_items"]
    assert all(r["bank_reencoded_rows"] == warm and r["bank_reencode_seconds"] >= 0 for r in reencodes)  # every written row, once
    assert all(0 < r["bank_staleness_before_reencode"] < 1 for r in reencodes)
    state = final_state(run)
    items = FeatureMaps.load(DatasetLayout(data), "p90").of_column(schema.TARGET_ITEM)
    tokens = torch.from_numpy(load_content_tokens(DatasetLayout(data), items, 8))
    written = state[BANK].abs().sum(dim=1) > 0
    assert int(written.sum()) == warm
    with torch.no_grad():
        expected_values = encoder_of(state, data)(tokens[written])
    torch.testing.assert_close(state[BANK][written], expected_values, atol=1e-5, rtol=1e-4)  # evaluation reads the final encoder
