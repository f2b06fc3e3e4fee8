"""The training loop's samples/s counts real samples: not the weight-0 rows that pad a rank's last
batch so that all ranks step together. A run directory's metrics.jsonl reads as one run: a resumed
run's log equals an uninterrupted run's, and a fresh run into a used directory starts a new log,
moving the earlier run's files aside. Evaluated rows saved on request give the logged metrics."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from muse_rec.config import DataConfig
from muse_rec.data.loader import ShardDataset, make_dataloader
from muse_rec.train.checkpoint import LATEST, checkpoint_root
from muse_rec.train.loop import CONFIG, EVAL_SCORES, METRICS, real_rows_per_step
from muse_rec.train.metrics import EvalRows, exact_gauc

WORLD = 2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_real_rows_per_step_are_the_loaders_weighted_rows(synthetic_root, num_workers):
    config = dataclasses.replace(DataConfig(), root=str(synthetic_root), batch_size=50, long_seq_len=8, num_workers=num_workers)
    datasets = [ShardDataset(config, "train", rank, WORLD) for rank in range(WORLD)]
    per_rank = [[int((batch.weights > 0).sum()) for batch in make_dataloader(d)] for d in datasets]
    loaded = [sum(step) for step in zip(*per_rank)]
    assert real_rows_per_step(datasets[0], WORLD) == loaded
    assert sum(loaded) == datasets[0].plan.total_rows
    assert (loaded[-1] < WORLD * config.batch_size) == (num_workers == 0)  # 2 workers: the short, padded batch comes earlier


RESUMED_FROM = 3


@pytest.fixture(scope="module")
def whole(synthetic_root, tmp_path_factory) -> Path:
    """An uninterrupted one-rank run: 11 steps, a checkpoint every 3 (all kept), a record every 2,
    its evaluated rows saved."""
    run = tmp_path_factory.mktemp("whole")
    train(synthetic_root, run, "train.save_eval_scores=true")
    return run


def train(data: Path, out: Path, *overrides: str) -> str:
    """`muse-rec train` on one rank; its log output."""
    command = [
        sys.executable, "-m", "muse_rec.cli", "train", "--quiet", f"data.root={data}", "data.batch_size=64", "data.num_workers=0",
        "data.long_seq_len=50", "model.keep_top=10", f"train.out={out}", "train.checkpoint_every=3", "train.keep_checkpoints=10",
        "train.log_every=2", *overrides,
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def test_a_resumed_run_logs_each_step_once_as_an_uninterrupted_run(synthetic_root, whole, tmp_path):
    """The records a killed attempt wrote after its checkpoint are logged again by the resumed run:
    kept, they would show those steps twice."""
    run = tmp_path / "run"
    shutil.copytree(whole, run)
    first = checkpoint_root(run) / f"step-{RESUMED_FROM:08d}"
    for later in checkpoint_root(run).glob("step-*"):  # as if killed after the step-3 checkpoint, having logged on
        if later != first:
            shutil.rmtree(later)
    (checkpoint_root(run) / LATEST).write_text(f"{first.name}\n")
    with (run / METRICS).open("a") as log:
        log.write('{"step": 12, "lo')  # and cut short a write

    logged = train(synthetic_root, run)
    assert f"resuming from {first}" in logged, logged[-3000:]
    assert without_rates(records(run)) == without_rates(records(whole))


def test_a_fresh_run_into_a_used_directory_sets_the_earlier_run_aside(synthetic_root, whole, tmp_path):
    """The earlier run's log, config and checkpoints are its only record: moved, not appended to,
    overwritten or pruned."""
    run = tmp_path / "run"
    shutil.copytree(whole, run)
    earlier = {name: (whole / name).read_bytes() for name in (METRICS, EVAL_SCORES, CONFIG)}

    logged = train(synthetic_root, run, "train.resume=false", "train.log_every=3")
    (aside,) = run.glob("prev-run-*")
    assert f"held an earlier run: its checkpoints, {METRICS}, {EVAL_SCORES}, {CONFIG} moved to {aside}" in logged, logged[-3000:]
    assert {name: (aside / name).read_bytes() for name in (METRICS, EVAL_SCORES, CONFIG)} == earlier
    assert not (run / EVAL_SCORES).exists()  # this run did not ask to save its rows
    assert sorted(p.name for p in checkpoint_root(aside).iterdir()) == sorted(p.name for p in checkpoint_root(whole).iterdir())
    logged_now = records(run)
    assert [r["step"] for r in logged_now if "split" not in r] == [3, 6, 9, 11]
    assert [r["split"] for r in logged_now if "split" in r] == ["test"]
    assert "log_every: 3" in (run / CONFIG).read_text()


def test_saved_evaluation_rows_give_the_logged_metrics(whole):
    rows = EvalRows.load(whole / EVAL_SCORES)
    (test,) = [r for r in records(whole) if r.get("split") == "test"]
    assert rows.labels.size == test["rows"]
    assert exact_gauc(rows.user_ids, rows.scores, rows.labels) == (test["gauc"], test["gauc_users"])


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / METRICS).read_text().splitlines()]


def without_rates(logged: list[dict]) -> list[dict]:
    """The records less samples/s, a measurement of the machine."""
    return [{k: v for k, v in r.items() if k != "samples_per_second"} for r in logged]
