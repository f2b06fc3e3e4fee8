"""Training and evaluation, top to bottom: process group, data, model, sharding, pipeline, metrics.

Runs under torchrun (or torchx, which wraps it) on 1..N ranks: gloo on CPU, NCCL on CUDA. Without
torchrun's environment it runs as a single rank. Rank 0 writes `metrics.jsonl` and
`config.yaml` into the run directory and prints where they went. The directory holds one run
(`_prepare_run_dir`): a resumed run's log reads as if it had never stopped, and a fresh run moves an
earlier run's files aside.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from muse_rec.config import Config, config_from_dict, to_dict
from muse_rec.data import schema
from muse_rec.data.atomic import atomic_path, write_json
from muse_rec.data.content import load_content_tokens
from muse_rec.data.feature_map import FeatureMaps
from muse_rec.data.layout import DatasetLayout
from muse_rec.data.loader import ShardDataset, batch_order, make_dataloader, plan_rank
from muse_rec.distributed.memory_bank import bind_memory_bank, gather_bank_metrics
from muse_rec.distributed.planning import load_plan
from muse_rec.distributed.table_weights import init_trainable_tables, load_scl_table
from muse_rec.distributed.sharding import ShardedModel, shard_model
from muse_rec.distributed.warm_start import reencode_bank, scl_content_source, warm_start_bank
from muse_rec.model.factory import make_model
from muse_rec.model.lemur import TargetEncoding
from muse_rec.batch import batch_layout
from muse_rec.train import checkpoint
from muse_rec.train.metrics import EvalAccumulator
from muse_rec.train.pipeline import train_pipeline

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
EVAL_SCORES = "eval_scores.npz"
"""Every evaluated row (user ID, score, label), with `train.save_eval_scores` (`metrics.EvalRows`)."""
CONFIG = "config.yaml"


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    device: torch.device


def init_distributed() -> Runtime:
    """Join torchrun's process group (or make a one-rank group): NCCL on CUDA, gloo on CPU."""
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        keep_freed_memory()
    return Runtime(dist.get_rank(), dist.get_world_size(), device)


def shutdown_distributed() -> None:
    """Leave the process group cleanly: a gloo group torn down by interpreter exit can abort the
    process ("terminate called without an active exception") after the work is done."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def keep_freed_memory() -> None:
    """glibc: serve large blocks from the heap (no mmap) and never trim it, so each step's big
    temporaries (the SCL lookup alone is 512 MB at batch 1000) reuse pages instead of faulting in
    fresh zeroed ones: 2.7-4x faster CPU steps (benchmarks/train_throughput.py); memory stays at
    its peak. A no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt(3); a trim threshold of -1 disables trimming
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, -1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(config: Config, maps: FeatureMaps, runtime: Runtime, train: bool = True) -> ShardedModel:
    """The model on the meta device, sharded by DMP (which materialises it) with the plan file
    `sharding.plan` or a plan made collectively now, SCL table filled (lemur: bank bound and empty,
    content loaded)."""
    torch.manual_seed(config.train.seed)
    model = make_model(config.model, maps.table_rows(), device=torch.device("meta"))
    plan = load_plan(config.sharding.plan, runtime.device.type, runtime.world_size, model) if config.sharding.plan else None
    sharded = shard_model(model, config.optim, runtime.device, plan, config.sharding, config.hardware, config.data, train)
    init_trainable_tables(sharded.model, config.train.seed, config.model.init_std)
    load_scl_table(sharded.model, maps.scl, runtime.device)
    _prepare_lemur(sharded, config, maps, runtime)
    return sharded


def _prepare_lemur(sharded: ShardedModel, config: Config, maps: FeatureMaps, runtime: Runtime) -> None:
    """Bind the memory bank to this rank's shards, load item content, seed the p/q draws per rank,
    and take the encoder of `model.lemur.encoder_checkpoint` if set. A no-op for other methods."""
    found = [m for m in sharded.model.modules() if isinstance(m, TargetEncoding)]
    if not found:
        return
    targets = found[0]
    lemur = config.model.lemur
    bind_memory_bank(sharded.model)
    if lemur.content_input == "tokens":
        tokens = load_content_tokens(DatasetLayout(config.data.root), maps.of_column(schema.TARGET_ITEM), lemur.max_tokens)
        targets.set_tokens(torch.from_numpy(tokens).to(runtime.device))
    else:  # content_input=scl: the warm start and the refresh read items' vectors from the values file
        targets.set_content_source(scl_content_source(maps))
    targets.seed(config.train.seed * 7919 + runtime.rank)
    if lemur.encoder_checkpoint:
        names = checkpoint.load_weights(Path(lemur.encoder_checkpoint), sharded, "targets.encoder.")
        if runtime.rank == 0:
            log.info("encoder initialised from %s (%d tensors)", lemur.encoder_checkpoint, len(names))


def train(config: Config, progress: bool = True) -> dict:
    """Train one epoch on the train split (resuming from the run's newest checkpoint if any),
    checkpoint, and evaluate on the test split; returns the test metrics."""
    runtime = init_distributed()
    out = Path(config.train.out)
    maps = FeatureMaps.load(DatasetLayout(config.data.root), config.data.vocab, strict=config.data.strict)
    sharded = build_model(config, maps, runtime)
    run = checkpoint.run_identity(config, maps.table_rows())
    resumed = _resume(config, sharded, runtime, out, run)
    start_step = resumed or 0
    writer = MetricsWriter(out / METRICS if runtime.rank == 0 else None)
    if runtime.rank == 0:
        _prepare_run_dir(out, config, writer, resumed)
    warm_start = warm_start_bank(sharded.model, config, maps, out, start_step, progress)  # lemur: fill the bank first
    if warm_start:
        writer.write({"step": start_step, **warm_start})

    dataset = ShardDataset(config.data, "train", runtime.rank, runtime.world_size, maps, start_step=start_step,
                           layout=batch_layout(config.model))
    steps = start_step + len(dataset)
    pipeline = train_pipeline(sharded.model, sharded.optimizer, runtime.device, config.model)
    batches = iter(make_dataloader(dataset, pin_memory=runtime.device.type == "cuda"))
    sharded.model.train()
    bar = tqdm(range(start_step, steps), initial=start_step, total=steps, desc="train", unit="step", disable=not progress or runtime.rank != 0)
    real_rows = real_rows_per_step(dataset, runtime.world_size)
    start, samples, shown_loss = time.perf_counter(), 0, "-"
    for step in bar:
        loss = pipeline.progress(batches)[0]
        samples += real_rows[step]
        done = step + 1
        logged = done % config.train.log_every == 0 or done == steps
        # Reading the loss waits for the device: only on logged steps, so the pipeline runs ahead between them.
        value = loss.item() if logged else None
        rate = samples / (time.perf_counter() - start)
        if value is not None:
            shown_loss = f"{value:.4f}"
            writer.write({"step": done, "loss": value, "samples_per_second": rate, **gather_bank_metrics(sharded.model)})
        bar.set_postfix(loss=shown_loss, samples_per_s=f"{rate:,.0f}")
        if reencodes(config, done, steps):  # before the checkpoint: a saved bank is the saved encoder's
            writer.write({"step": done, **reencode_bank(sharded.model)})
        if done == steps or (config.train.checkpoint_every and done % config.train.checkpoint_every == 0):
            _checkpoint(config, sharded, runtime, out, run, done)
    pipeline.detach()  # restore the modules' own forwards for evaluation
    gather_bank_metrics(sharded.model)  # evaluation reports its own bank reads
    metrics = evaluate(sharded, config, maps, runtime, progress, out / EVAL_SCORES)
    writer.write({"step": steps, "split": "test", **metrics})
    if runtime.rank == 0:
        log.info("run directory: %s (%s, %s, checkpoints/)", out.resolve(), METRICS, CONFIG)
    return {**metrics, "rank": runtime.rank}


def reencodes(config: Config, done: int, steps: int) -> bool:
    """Whether lemur re-encodes its whole bank after training step `done` of `steps`
    (`model.lemur.reencode_every`, `reencode_before_eval`): a function of the step alone, so a
    resumed run re-encodes where the uninterrupted one did."""
    if config.model.method != "lemur":
        return False
    lemur = config.model.lemur
    return bool(lemur.reencode_every and done % lemur.reencode_every == 0) or (lemur.reencode_before_eval and done == steps)


def real_rows_per_step(dataset: ShardDataset, world_size: int) -> list[int]:
    """Samples all ranks train on at each step, in the order the loader yields the batches: the
    weight-0 rows that pad a rank's last batch are not samples. Every rank's plan follows from the
    row groups, so no step waits on a collective to count."""
    plans = [plan_rank(dataset.plan.row_groups, dataset.config.batch_size, r, world_size) for r in range(world_size)]
    rows = [sum(p.batches[b].stop - p.batches[b].start for p in plans) for b in range(len(dataset.plan.batches))]
    return [rows[b] for b in batch_order(len(rows), dataset.config.num_workers)]


def _resume(config: Config, sharded: ShardedModel, runtime: Runtime, out: Path, run: checkpoint.RunIdentity) -> int | None:
    """Steps already done: None for a fresh run, else the position of the run's newest checkpoint,
    checked to be this run's and to mean the same batches here, then loaded."""
    path = checkpoint.latest(out) if config.train.resume else None
    if path is None:
        return None
    checkpoint.check_resumable(path, run, runtime.world_size, config.data.batch_size, config.data.num_workers)
    position = checkpoint.load(path, sharded, with_optimizer=True)
    if runtime.rank == 0:
        log.info("resuming from %s at step %d", path, position.step)
    return position.step


def _prepare_run_dir(out: Path, config: Config, writer: MetricsWriter, resumed: int | None) -> None:
    """Make `out` hold this run alone (rank 0): a resumed run's log keeps the records up to its
    checkpoint; a fresh run sets an earlier run's files aside. Then config.yaml is this run's."""
    out.mkdir(parents=True, exist_ok=True)
    if resumed is None:
        _set_aside_earlier_run(out)
    else:
        writer.keep_until(resumed)
    with atomic_path(out / CONFIG) as tmp:
        tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def _set_aside_earlier_run(out: Path) -> None:
    """Move an earlier run's checkpoints, log, evaluated rows and config into `out/prev-run-<time>/`, deleting
    nothing: the log would otherwise be appended to and the config overwritten, and this run's saves
    would prune the checkpoints, or keep the longer earlier run's in place of its own."""
    earlier = [out / name for name in (checkpoint.checkpoint_root(out).name, METRICS, EVAL_SCORES, CONFIG) if (out / name).exists()]
    if all(path.name == CONFIG for path in earlier):
        return  # a config alone: the earlier run neither logged nor saved
    aside = out / f"prev-run-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()  # never into an existing one, where a rename could replace a file
    for path in earlier:  # checkpoints first: a kill in between leaves a log without them, which a re-run sets aside too
        path.rename(aside / path.name)
    log.warning("%s held an earlier run: its %s moved to %s", out, ", ".join(path.name for path in earlier), aside)


def _checkpoint(config: Config, sharded: ShardedModel, runtime: Runtime, out: Path, run: checkpoint.RunIdentity, step: int) -> None:
    position = checkpoint.Position(step, runtime.world_size, config.data.batch_size, config.data.num_workers)
    checkpoint.save(out, sharded, position, run, to_dict(config), keep=config.train.keep_checkpoints)


def evaluate_checkpoint(path: Path, overrides: list[str], progress: bool = True) -> dict:
    """Evaluate a saved model on the test split, on any world size; writes eval.json beside it."""
    config = config_from_dict(_unbound_from_training_hardware(checkpoint.read_meta(path)["config"]), overrides)
    runtime = init_distributed()
    maps = FeatureMaps.load(DatasetLayout(config.data.root), config.data.vocab, strict=config.data.strict)
    sharded = build_model(config, maps, runtime, train=False)
    position = checkpoint.load(path, sharded, with_optimizer=False)
    metrics = {**evaluate(sharded, config, maps, runtime, progress, Path(path) / EVAL_SCORES), "step": position.step, "checkpoint": str(path)}
    if runtime.rank == 0:
        write_json(Path(path) / "eval.json", metrics)
        log.info("evaluation written to %s", Path(path) / "eval.json")
    return {**metrics, "rank": runtime.rank}


def _unbound_from_training_hardware(saved: dict) -> dict:
    """A checkpoint loads into any sharding: the training job's hardware profile and plan file
    would tie evaluation to its device type and world size, so they are dropped (overrides may
    set them again)."""
    return {**saved, "hardware": {}, "sharding": {**saved.get("sharding", {}), "plan": None}}


@torch.no_grad()
def evaluate(
    sharded: ShardedModel, config: Config, maps: FeatureMaps, runtime: Runtime, progress: bool = True, scores_path: Path | None = None
) -> dict:
    """Exact AUC and GAUC over the whole test split (all ranks), plus the reference's numbers; with
    `train.save_eval_scores`, rank 0 writes every evaluated row to `scores_path`."""
    data = dataclasses.replace(config.data, batch_size=config.train.eval_batch_size)
    dataset = ShardDataset(data, "test", runtime.rank, runtime.world_size, maps, layout=batch_layout(config.model))
    sharded.model.eval()
    accumulator = EvalAccumulator()
    for batch in tqdm(make_dataloader(dataset), total=len(dataset), desc="eval", unit="step", disable=not progress or runtime.rank != 0):
        _, (_, scores, labels, weights, user_ids) = sharded.model(batch.to(runtime.device))
        accumulator.update(user_ids, scores, labels, weights)
    sharded.model.train()
    save = scores_path if config.train.save_eval_scores and runtime.rank == 0 else None
    metrics = accumulator.compute(bootstrap_draws=config.train.eval_gauc_se_draws, save_to=save)
    if save is not None:
        log.info("evaluated rows written to %s", save)
    bank = gather_bank_metrics(sharded.model)
    if bank:
        metrics |= bank | {"lemur_targets_from": config.model.lemur.eval_target}
        if runtime.rank == 0 and config.model.lemur.eval_target == "bank":
            log.info("lemur: scored from the memory bank alone (targets and histories; the encoder was not run)")
    return metrics


class MetricsWriter:
    """JSON lines, appended and flushed as they come (rank 0 only; other ranks pass None)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def write(self, record: dict) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def keep_until(self, step: int) -> None:
        """Drop what was logged after the checkpoint at `step` (later steps, evaluations), which the
        resumed run logs again, so the log reads as one uninterrupted run; a line without its newline
        (a write a kill cut short) goes too. The file is replaced atomically."""
        if self.path is None or not self.path.exists():
            return
        lines = self.path.read_text().split("\n")[:-1]
        kept = [line + "\n" for line in lines if _before_checkpoint(json.loads(line), step)]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(kept))


def _before_checkpoint(record: dict, step: int) -> bool:
    """A training record up to `step`: evaluations follow the last checkpoint."""
    return "split" not in record and record["step"] <= step
