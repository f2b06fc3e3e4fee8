"""Resuming is refused, with the key that differs and how to start fresh, when the checkpoint is
another run's or its step count would mean other batches here; a save cut short leaves `latest`
naming a checkpoint that is gone, and resuming then takes the newest complete one."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from muse_rec.errors import MuseRecError
from muse_rec.train.checkpoint import LATEST, META, FRESH_START, Position, RunIdentity, check_resumable, latest, write_meta

RUN = RunIdentity(method="muse", data_root="/data/synthetic", vocab="p90", table_rows={"item": 1512, "category": 11, "scl": 1512})
POSITION = Position(step=3, world_size=2, batch_size=12, num_workers=2)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    write_meta(tmp_path, POSITION, RUN, config={})
    return tmp_path


def check(path: Path, run: RunIdentity = RUN, **batching) -> None:
    check_resumable(path, run, **{"world_size": 2, "batch_size": 12, "num_workers": 2, **batching})


def test_the_same_run_resumes(saved):
    check(saved)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"method": "din"}, "model.method is 'muse' there, 'din' here"),
        ({"data_root": "/data/taobao"}, "data.root is '/data/synthetic' there, '/data/taobao' here"),
        ({"vocab": "full"}, "data.vocab is 'p90' there, 'full' here"),
        ({"table_rows": {**RUN.table_rows, "item": 99}}, "table item has 1512 rows there, 99 here"),
        ({"table_rows": {"item": 1512, "category": 11}}, "table scl has 1512 rows there, None here"),
    ],
)
def test_another_runs_checkpoint_is_refused(saved, change, named):
    with pytest.raises(MuseRecError, match="another run's checkpoint") as error:
        check(saved, dataclasses.replace(RUN, **change))
    assert named in str(error.value) and FRESH_START in str(error.value)


@pytest.mark.parametrize(
    ("batching", "named"),
    [
        ({"world_size": 1}, "2 rank(s) x batch 12"),
        ({"batch_size": 10}, "this run has 2 x 10"),
        ({"num_workers": 1}, "data.num_workers=2, this run has data.num_workers=1"),
    ],
)
def test_other_batches_are_refused(saved, batching, named):
    with pytest.raises(MuseRecError) as error:
        check(saved, **batching)
    assert named in str(error.value) and FRESH_START in str(error.value)


def test_no_worker_and_one_worker_read_batches_in_the_same_order(tmp_path):
    write_meta(tmp_path, dataclasses.replace(POSITION, num_workers=0), RUN, config={})
    check(tmp_path, num_workers=1)


def test_a_checkpoint_without_the_new_records_is_refused_by_name(saved):
    meta = json.loads((saved / META).read_text())
    del meta["position"]["num_workers"], meta["run"]
    (saved / META).write_text(json.dumps(meta))
    with pytest.raises(MuseRecError, match=r"has no run\.method, run\.data_root, run\.vocab, run\.table_rows"):
        check(saved)


@pytest.mark.parametrize(
    ("complete", "named", "found"),
    [
        (["step-00000003", ".step-00000006.aside"], "step-00000006", ".step-00000006.aside"),  # a re-save, between its renames
        (["step-00000003"], None, "step-00000003"),  # the first save, before latest was written
        (["step-00000003"], "step-00000006", "step-00000003"),  # latest names a directory deleted by hand
    ],
)
def test_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path, caplog, complete, named, found):
    root = tmp_path / "checkpoints"
    for name in complete:
        (root / name).mkdir(parents=True)
        write_meta(root / name, POSITION, RUN, config={})
    (root / "step-00000009").mkdir()  # no meta.json: a half-written or half-deleted directory
    if named:
        (root / LATEST).write_text(named + "\n")
    assert latest(tmp_path) == root / found
    assert "a save was interrupted" in caplog.text


def test_latest_refuses_to_guess_when_no_checkpoint_is_complete(tmp_path):
    (tmp_path / "checkpoints" / "step-00000009").mkdir(parents=True)
    (tmp_path / "checkpoints" / LATEST).write_text("step-00000009\n")
    with pytest.raises(MuseRecError, match="not a complete checkpoint, and there is no other") as error:
        latest(tmp_path)
    assert FRESH_START in str(error.value)
