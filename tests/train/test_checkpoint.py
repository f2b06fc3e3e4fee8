"""Checkpoints: a 2-rank run killed mid-training resumes to the same weights, optimizer state and
metrics as an uninterrupted run (with 2 loader workers, whose interleaved batch order the step
count must resume); a save failing at any file-system call leaves the old or the new checkpoint
to resume from; a checkpoint evaluates on another world size, holds no SCL table (a model loaded
from it keeps the values file's), and another run refuses to resume from it."""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from muse_rec.config import SynthConfig, config_from_dict
from muse_rec.data.feature_map import FeatureMaps, SclIndex
from muse_rec.data.layout import DatasetLayout
from muse_rec.data.synth import synthesize
from muse_rec.distributed.table_weights import SCL_WEIGHT_SUFFIX
from muse_rec.train import checkpoint
from muse_rec.train.checkpoint import FRESH_START, checkpoint_root, latest, read_meta
from muse_rec.train.loop import Runtime, build_model, evaluate
from tests.gloo import gloo_group
from tests.train.test_loop import records, without_rates
from tests.train.test_sharded_training import full_weights

STEPS_BETWEEN_CHECKPOINTS = 3
LOG_EVERY = 2
WORKERS = 2
ONE_RANK = Runtime(0, 1, torch.device("cpu"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    synthesize(SynthConfig(seed=3, train_users=60, test_users=20, items=3000, categories=10, row_group_rows=100), root, progress=False)
    return root


@pytest.fixture(scope="module")
def whole(data, tmp_path_factory) -> Path:
    """An uninterrupted 2-rank run."""
    run = tmp_path_factory.mktemp("whole")
    subprocess.run(train_command(data, run), check=True, capture_output=True)
    return run


def train_command(data: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "muse_rec.cli",
        *train_arguments(data, out),
    ]


def train_arguments(data: Path, out: Path) -> list[str]:
    return [
        "train", "--quiet", f"data.root={data}", "data.batch_size=12", f"data.num_workers={WORKERS}",
        "data.long_seq_len=200", "model.keep_top=20", f"train.out={out}",
        f"train.checkpoint_every={STEPS_BETWEEN_CHECKPOINTS}", "train.keep_checkpoints=1", f"train.log_every={LOG_EVERY}",
    ]


def final_state(run: Path) -> dict:
    path = latest(run)
    flat = run / "final.pt"
    dcp_to_torch_save(path, flat)
    return torch.load(flat, weights_only=False)


def test_killed_run_resumes_to_the_same_result(data, whole, tmp_path):
    killed = tmp_path / "killed"

    process = subprocess.Popen(train_command(data, killed), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while latest(killed) is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    kill_started(process)  # torchrun and both ranks at once, wherever they are
    process.wait()
    first = latest(killed)
    assert first is not None and first.name == f"step-{STEPS_BETWEEN_CHECKPOINTS:08d}", "the kill came too late to test a resume"
    metrics = killed / "metrics.jsonl"
    assert not metrics.exists() or '"split": "test"' not in metrics.read_text()  # killed before evaluating

    resumed = subprocess.run(train_command(data, killed), check=True, capture_output=True, text=True)
    assert f"resuming from {first}" in resumed.stderr, resumed.stderr[-3000:]
    expected, got = final_state(whole), final_state(killed)
    assert expected.keys() == got.keys()
    for key in ("model", "optimizer"):
        flat_expected, flat_got = _flatten(expected[key]), _flatten(got[key])
        assert flat_expected.keys() == flat_got.keys()
        for name, value in flat_expected.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(flat_got[name], value), name
    assert without_rates(records(killed)) == without_rates(records(whole))  # each step once, as if never killed
    assert [p.name for p in checkpoint_root(killed).glob("step-*")] == [latest(killed).name]  # keep_checkpoints=1


def test_checkpoint_evaluates_on_another_world_size(whole):
    path = latest(whole)
    done = subprocess.run(
        [sys.executable, "-m", "muse_rec.cli", "eval", "--quiet", "--checkpoint", str(path)],
        check=True, capture_output=True, text=True,
    )
    one_rank = json.loads((path / "eval.json").read_text())
    two_ranks = _test_record(whole)
    for key in ("auc", "gauc", "logloss"):  # exact metrics; the reference's per-batch GAUC depends on batching
        assert one_rank[key] == pytest.approx(two_ranks[key], abs=1e-6), key
    assert one_rank["rows"] == two_ranks["rows"] and "test: AUC" in done.stdout


def test_train_records_every_log_every_steps_and_at_the_end(whole):
    steps = read_meta(latest(whole))["position"]["step"]
    trained = [r for r in records(whole) if "split" not in r]
    assert [r["step"] for r in trained] == sorted({*range(LOG_EVERY, steps + 1, LOG_EVERY), steps})
    assert all(r.keys() == {"step", "loss", "samples_per_second"} and r["loss"] > 0 for r in trained)


def test_checkpoint_holds_no_scl_table(whole):
    saved = FileSystemReader(latest(whole)).read_metadata().state_dict_metadata
    assert not [key for key in saved if "scl" in key]
    assert "model.sequence_tables.embeddings.item.weight" in saved
    assert [key for key in saved if key.startswith("optimizer.state.sequence_tables.embeddings.item.weight.")]


def test_a_loaded_and_evaluated_checkpoint_keeps_the_scl_values_file(data, whole, tmp_path):
    """Trained with the GSU in the loader, evaluated with it in the model (the SCL table filled from
    the values file): the checkpoint holds the same state either way."""
    weights = _load_and_evaluate(latest(whole), tmp_path / "init", ["model.gsu_stage=model"])
    (scl_key,) = [k for k in weights if k.endswith(SCL_WEIGHT_SUFFIX)]
    layout = DatasetLayout(data)
    values = SclIndex(layout.scl_keys_path, layout.scl_values_path).values
    table = weights.pop(scl_key).float()
    assert torch.equal(table[0], torch.zeros(values.shape[1])) and torch.equal(table[1:], torch.from_numpy(values.astype("float32")))
    saved = final_state(whole)["model"]
    assert weights.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(weights[key], value), key


def _load_and_evaluate(path: Path, init_file: Path, overrides: list[str]) -> dict[str, torch.Tensor]:
    """What `muse-rec eval` does, on one rank in this process; the model's weights after evaluating."""
    with gloo_group(init_file):
        config = config_from_dict(read_meta(path)["config"], overrides)
        maps = FeatureMaps.load(DatasetLayout(config.data.root), config.data.vocab)
        sharded = build_model(config, maps, ONE_RANK)
        checkpoint.load(path, sharded, with_optimizer=False)
        evaluate(sharded, config, maps, ONE_RANK, progress=False)
        return full_weights(sharded.model, 0)


class Crash(Exception):
    """An injected failure."""


FILE_SYSTEM_CALLS = [(Path, "mkdir"), (Path, "rename"), (Path, "write_text"), (Path, "unlink"), (os, "replace"), (shutil, "rmtree")]
"""What a save changes the file system with (DCP's writer included): where a kill can land."""
MARKED = "dense.long_attention.tau"
OLD, NEW, AFTER = 1.0, 2.0, 3.0


@pytest.mark.parametrize(("old_step", "new_step"), [(3, 6), (3, 3)], ids=["next-step", "same-step-again"])
def test_a_save_failing_at_any_file_system_call_leaves_a_checkpoint_to_resume(data, tmp_path, monkeypatch, old_step, new_step):
    """The n-th file-system call of a save, and every later one, fail (a kill there), for each n
    until a save gets through: the run still finds the old or the new checkpoint, complete (its
    weights are the ones its meta.json was saved with), and saves again, leaving nothing behind."""
    with gloo_group(tmp_path / "init"):
        config = config_from_dict({}, [f"data.root={data}", "data.batch_size=12", "data.long_seq_len=200", "model.keep_top=20"])
        maps = FeatureMaps.load(DatasetLayout(data), config.data.vocab)
        sharded = build_model(config, maps, ONE_RANK)
        sharded.dense_optimizer.init_state()  # saved and loaded with the optimizer, as training does
        run = checkpoint.run_identity(config, maps.table_rows())
        marked = dict(sharded.model.named_parameters())[MARKED]

        def save(out: Path, step: int, label: float) -> None:
            """A checkpoint whose weights and meta.json both carry `label`."""
            with torch.no_grad():
                marked.fill_(label)
            checkpoint.save(out, sharded, checkpoint.Position(step, 1, 12, 0), run, {"label": label}, keep=1)

        for n in itertools.count(1):
            out = tmp_path / f"crash-{n}"
            save(out, old_step, OLD)
            with monkeypatch.context() as patch:
                calls = _fail_from(patch, n)
                try:
                    save(out, new_step, NEW)
                except (Exception, CheckpointException) as error:  # Crash, or DCP's (a BaseException) around it
                    assert len(calls) >= n, error
            if len(calls) < n:
                break  # the save made fewer calls: each one has failed once
            found = latest(out)
            label = read_meta(found)["config"]["label"]
            assert label in (OLD, NEW), (n, calls[-1])
            assert checkpoint.load(found, sharded, with_optimizer=True).step == (old_step if label == OLD else new_step)
            assert torch.equal(marked, torch.full_like(marked, label)), (n, calls[-1])
            save(out, 9, AFTER)
            assert sorted(p.name for p in checkpoint_root(out).iterdir()) == [checkpoint.LATEST, "step-00000009"], (n, calls[-1])
        assert n > 10, "the save's calls were not intercepted"


def _fail_from(monkeypatch: pytest.MonkeyPatch, n: int) -> list[str]:
    """Make the n-th file-system call (FILE_SYSTEM_CALLS) and every later one raise Crash; returns
    the calls made, by name."""
    calls: list[str] = []
    for owner, name in FILE_SYSTEM_CALLS:
        def failing(*args, _real=getattr(owner, name), _name=name, **kwargs):
            calls.append(_name)
            if len(calls) >= n:
                raise Crash(f"call {len(calls)}: {_name}")
            return _real(*args, **kwargs)
        monkeypatch.setattr(owner, name, failing)
    return calls


def test_another_run_refuses_to_resume_from_the_checkpoint(data, whole):
    meta = read_meta(latest(whole))
    assert meta["position"]["num_workers"] == WORKERS
    table_rows = FeatureMaps.load(DatasetLayout(data), "p90").table_rows()
    assert meta["run"] == {"method": "muse", "data_root": str(data.resolve()), "vocab": "p90", "table_rows": table_rows}
    din = [sys.executable, "-m", "muse_rec.cli", *train_arguments(data, whole), "model.method=din"]  # same train.out
    refused = subprocess.run(din, capture_output=True, text=True)
    assert refused.returncode != 0, refused.stderr[-3000:]
    assert "model.method is 'muse' there, 'din' here" in refused.stderr and FRESH_START in refused.stderr, refused.stderr[-3000:]


def kill_started(process: subprocess.Popen) -> None:
    """SIGKILL the torchrun this test started (in a session of its own) and the ranks it launched, by
    their process groups: torchrun starts each rank in a session of its own, with its loader workers."""
    groups = {process.pid}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent, group = stat.read_text().rpartition(")")[2].split()[1:3]  # after the command name: state, ppid, pgrp
        except OSError:  # exited meanwhile
            continue
        if int(parent) == process.pid:
            groups.add(int(group))
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)


def _test_record(run: Path) -> dict:
    (test,) = [r for r in records(run) if r.get("split") == "test"]
    return test


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}/").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, value in enumerate(tree) for k, v in _flatten(value, f"{prefix}{i}/").items()}
    return {prefix: tree}
