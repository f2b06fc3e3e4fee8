"""LEMUR on synthetic data with item titles: frozen SCL vectors (MUSE), the paper's two-stage arm and
end-to-end `lemur`, with the bank's coverage and staleness, ablations, and what lemur costs.

Data: one synthetic set (`muse_rec.data.synth`) where a share of the SCL vectors mislead
(`--scl-mislabel-share`, synth.scl_mislabel_share: drawn around a sibling cluster of the item's
category) while every item's title names its true cluster, so the content carries click
information the frozen vectors lack. The oracle row scores with the true click probabilities.

Quality: each arm trains one epoch on `--nproc` CPU ranks through `muse-rec train` (torchrun jobs,
the same data, batch and optimizer overrides for all; the lemur arms take configs/
lemur_synthetic.yaml as it is: warm start, refresh, encoder learning rate) and is evaluated on the
whole test split, GAUC with its bootstrap SE over test users:
- DIN: the short sequence alone, the floor every long-sequence arm should clear.
- MUSE: configs/muse.yaml, frozen SCL vectors in the GSU and ESU.
- MUSE on a second set of the same rows where no SCL vector is mislabelled: what the content could
  add to MUSE at most (the lemur arms keep MUSE's GSU and ESU on the SCL vectors and add the
  representations beside them, `keep_scl`).
- two-stage, as the paper runs it: stage 1 trains the encoder on the contrastive losses alone
  (ranking_weight 0, contrastive_weight 1, and the yaml's co-occurrence loss; one epoch); stage 2 freezes it (train_encoder false,
  encoder_checkpoint), encodes every item of the item table once into the bank (warm_start
  all_items: 100 % coverage) and reads every target and history item from there (p = 0, no
  refresh) while the ranker trains on clicks.
- LEMUR end to end: the same stage-1 encoder, then trained jointly with the ranker for one epoch:
  the two differ only in joint training (each has one pretraining and one ranking epoch).
- LEMUR end to end from a random encoder (one epoch, no pretraining).
- the lemur machinery with its random encoder frozen, every item encoded once (what training adds).
With `--ablations`, runs like "LEMUR end to end" with one thing changed each: the representations in
the SCL vectors' place (keep_scl false: the GSU, SimTier and SA-TA on the representations), no warm
start and no refresh (the bank holds past targets only), no refresh, the sweep refresh instead of
the most-read one, the encoder at 5e-4 and at the dense learning rate (staleness; no re-encode), the encoder at the dense
learning rate with the whole bank re-encoded every 5 steps and before evaluation (a fresh bank:
is it staleness or the representation?), the whole bank re-encoded before evaluation, and every
10 steps too, the co-occurrence loss off end to end, the ranker's gradient stopped at the
target, two more gradient paths from the ranking loss into the encoder (the sorted-similarity
feature, a soft SimTier), a smaller and a larger encoder (these two from a random encoder: the
stage-1 checkpoint has another shape). `--ablations NAMES` runs only those named.
Each run saves its evaluated rows (train.save_eval_scores), so the comparisons the target names
(LEMUR against MUSE and two-stage, two-stage against DIN, each ablation against LEMUR) get their GAUC
difference with a paired bootstrap SE over the same test users (`paired_gauc_difference`).
Coverage and staleness come from the last training record of each run (metrics.jsonl). Each run's
final encoder also encodes `SEPARATION_ITEMS` catalogue items: mean cosine within a semantic
cluster, across clusters, and between clusters of one category (the SCL vectors: about 0.73 /
0.0 / 0.26), and the cosine between those items' bank rows and the final encoder's values (the
bank's staleness at evaluation time).

Cost: (1) one process, real batches of `--cost-batch-size`, forward + backward timed (median of
`--cost-steps` after two warm-up steps): MUSE with its GSU in the loader (the step reads the kept
positions only) and in the model (the whole sequence's SCL vectors looked up); lemur reading its history from the bank, without
and with the refresh; lemur encoding every distinct history item (history_source encoder). (2) The
training runs' samples/s on `--nproc` ranks. (3) The warm start of the end-to-end run (items, scan
and encoding seconds, items/s), from its metrics.jsonl. (4) The bank's planned memory for the full
vocabulary on the GPU profiles of configs/hardware/ (configs/lemur.yaml, planned offline as
`muse-rec plan` does).

    python benchmarks/lemur.py [--users 3000] [--test-users 1500] [--scl-mislabel-share 0.3] [--ablations [NAMES]]
        [--arms two_stage,lemur,lemur_scratch,frozen_random] [--pretrain-set KEY=VALUE] [--set KEY=VALUE]
        [--nproc 2] [--batch-size 250] [--cost-batch-size 250] [--cost-steps 5] [--out-dir benchmarks/results]

Prints the tables and saves <out-dir>/lemur.json and lemur.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "benchmarks"):  # run as a script from anywhere: the checkout's muse_rec, quality.py
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import plotting  # noqa: E402
from quality import common_overrides, oracle_metrics, run_training, summarize  # noqa: E402

from muse_rec.batch import batch_layout  # noqa: E402
from muse_rec.config import SynthConfig, load_config  # noqa: E402
from muse_rec.data import schema  # noqa: E402
from muse_rec.data import synth  # noqa: E402
from muse_rec.data.content import load_content_tokens  # noqa: E402
from muse_rec.data.feature_map import FeatureMaps  # noqa: E402
from muse_rec.data.layout import DatasetLayout  # noqa: E402
from muse_rec.data.loader import ShardDataset  # noqa: E402
from muse_rec.distributed import planning  # noqa: E402
from muse_rec.distributed.table_weights import load_scl_table, local_pieces  # noqa: E402
from muse_rec.errors import MuseRecError  # noqa: E402
from muse_rec.model.encoder import ContentEncoder  # noqa: E402
from muse_rec.model.factory import make_model  # noqa: E402
from muse_rec.model.lemur import LemurModel  # noqa: E402
from muse_rec.train.checkpoint import latest  # noqa: E402
from muse_rec.train.loop import EVAL_SCORES  # noqa: E402
from muse_rec.train.metrics import EvalRows, paired_gauc_difference  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LEMUR_CONFIG = ROOT / "configs" / "lemur_synthetic.yaml"
GPU_CONFIG = ROOT / "configs" / "lemur.yaml"
BANK_KEYS = ("bank_coverage_target", "bank_coverage_short", "bank_coverage_long", "bank_staleness_cosine", "bank_staleness_refresh")
SEPARATION_ITEMS = 4000
ENCODER_KEY = "targets.encoder."
BANK_WEIGHT = "bank_table.embeddings.bank.weight"
GPU_PROFILES = ("h100x1", "h100x8", "a100-40gbx8", "rtx4090x8", "h100x8x2nodes")
PRETRAIN = ["model.lemur.ranking_weight=0", "model.lemur.contrastive_weight=1"]
FROZEN_ONCE = ["model.lemur.train_encoder=false", "model.lemur.warm_start=all_items", "model.lemur.encode_share=0",
               "model.lemur.backward_share=0", "model.lemur.refresh_rows=0", "model.lemur.reencode_every=0",
               "model.lemur.reencode_before_eval=false"]
"""An encoder frozen and every item encoded once into the bank, read from there (the two-stage arm;
nothing to refresh or re-encode: the bank is the frozen encoder's)."""
REENCODE_FAST = ["model.lemur.reencode_every=5", "model.lemur.reencode_before_eval=true"]
"""The whole bank re-encoded every 5 steps and before evaluation: a fast encoder leaves no stale row."""
NO_REENCODE = ["model.lemur.reencode_every=0", "model.lemur.reencode_before_eval=false"]
LABELS = {
    "din": "DIN (short sequence only)",
    "muse": "MUSE (frozen SCL)",
    "muse_true_scl": "MUSE, no SCL vector mislabelled (the same rows: what the content could add)",
    "two_stage": "two-stage (contrastive pretrain, frozen, every item encoded once)",
    "lemur": "LEMUR end to end (same pretrained encoder)",
    "lemur_scratch": "LEMUR end to end from a random encoder",
    "frozen_random": "lemur machinery, random encoder frozen",
}
LEMUR_ARMS = ("two_stage", "lemur", "lemur_scratch", "frozen_random")
ABLATIONS = {
    "no_warm_start_no_refresh": ("no warm start, no refresh (bank = past targets)", ["model.lemur.warm_start=none", "model.lemur.refresh_rows=0"]),
    "no_refresh": ("warm start, no refresh", ["model.lemur.refresh_rows=0"]),
    "refresh_oldest": ("refresh: sweep (oldest) instead of most read", ["model.lemur.refresh_policy=oldest"]),
    "encoder_lr_5e-4": ("encoder learning rate 5e-4", ["optim.encoder_lr=0.0005"]),
    "fast_encoder": ("encoder at the dense learning rate", None),  # filled from --dense-lr
    "fast_encoder_reencode": ("encoder at the dense learning rate, whole bank re-encoded every 5 steps and before evaluation", None),
    "reencode_before_eval": ("whole bank re-encoded before evaluation", ["model.lemur.reencode_before_eval=true"]),
    "reencode_every_10": ("whole bank re-encoded every 10 steps and before evaluation",
                          ["model.lemur.reencode_every=10", "model.lemur.reencode_before_eval=true"]),
    "replace_scl": ("representations in the SCL vectors' place (GSU, SimTier, SA-TA), no SCL cosines", ["model.lemur.keep_scl=false"]),
    "no_cooccurrence": ("no co-occurrence loss end to end (the pretraining kept it)", ["model.lemur.cooccurrence_weight=0"]),
    "stop_gradient": ("stop-gradient: the ranker reads the target detached", ["model.lemur.ranker_gradient=false"]),
    "sorted_similarities": ("+ sorted-similarity feature (top 50 cosines to the tower)", ["model.lemur.sorted_similarities=50"]),
    "soft_simtier": ("+ soft SimTier (gradient through the similarity histogram)", ["model.lemur.soft_simtier=true"]),
    "small_encoder": ("smaller encoder (1 layer, width 32), from a random encoder", ["model.lemur.layers=1", "model.lemur.width=32"]),
    "large_encoder": ("larger encoder (4 layers, width 128), from a random encoder", ["model.lemur.layers=4", "model.lemur.width=128"]),
}
FROM_SCRATCH = ("small_encoder", "large_encoder")
"""Ablations of another encoder shape: the stage-1 checkpoint does not fit them, so they start from a
random encoder and compare with "LEMUR end to end from a random encoder"."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=3000, help="train users (default 3000)")
    p.add_argument("--test-users", type=int, default=1500, help="test users (default 1500)")
    p.add_argument("--scl-mislabel-share", type=float, default=0.3, help="share of misleading SCL vectors (default 0.3)")
    p.add_argument("--seed", type=int, default=42, help="seed of the data and of every model (default 42)")
    p.add_argument("--nproc", type=int, default=2, help="ranks per training job (default 2)")
    p.add_argument("--batch-size", type=int, default=250, help="samples per batch on each rank (default 250)")
    p.add_argument("--dense-lr", type=float, default=2e-3, help="AdamW learning rate, every arm (default 2e-3)")
    p.add_argument("--sparse-lr", type=float, default=0.05, help="CPU embedding optimizer learning rate (default 0.05)")
    p.add_argument("--arms", default=",".join(LEMUR_ARMS),
                   help=f"lemur arms to train, comma-separated, DIN and MUSE always (default {','.join(LEMUR_ARMS)})")
    p.add_argument("--ablations", nargs="?", const=",".join(ABLATIONS), default="", metavar="NAMES",
                   help=f"also the ablation runs (about 3 minutes each on 2 cores): all, or those named, comma-separated ({','.join(ABLATIONS)})")
    p.add_argument("--pretrain-set", dest="pretrain_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for stage 1 alone, the contrastive pretraining (repeatable)")
    p.add_argument("--cost-batch-size", type=int, default=250, help="batch of the cost measurement (default 250)")
    p.add_argument("--cost-steps", type=int, default=5, help="timed steps per cost variant (default 5)")
    p.add_argument("--skip-quality", action="store_true", help="only the cost measurement and the plans")
    p.add_argument("--skip-plans", action="store_true", help="no offline plans of the GPU profiles")
    p.add_argument("--out-dir", default=str(RESULTS), help="results directory (default benchmarks/results)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override passed to every training job (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars from the training jobs")
    args = p.parse_args(argv)
    for option, given, known in (("--arms", args.arms, LEMUR_ARMS), ("--ablations", args.ablations, tuple(ABLATIONS))):
        unknown = set(filter(None, given.split(","))) - set(known)
        if unknown:
            p.error(f"{option}: unknown {', '.join(sorted(unknown))}; expected some of {', '.join(known)}")
    return args


def encoder_check(path: Path, data_root: Path, synth_cfg: SynthConfig, overrides: list[str]) -> dict[str, float]:
    """Over `SEPARATION_ITEMS` catalogue items and the checkpoint's encoder (evaluation mode): mean
    cosine within a semantic cluster, across clusters and across clusters of one category, and the
    mean cosine between each item's bank row and the encoder's value (read in one process)."""
    config = load_config(LEMUR_CONFIG, [f"data.root={data_root}", *overrides])
    layout = DatasetLayout(data_root)
    item_map = FeatureMaps.load(layout, "p90").of_column(schema.TARGET_ITEM)
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    keys = [k for k in meta if k.startswith("model.") and (ENCODER_KEY in k or k.endswith(BANK_WEIGHT))]
    state = {k: torch.empty(meta[k].size, dtype=meta[k].properties.dtype) for k in keys}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    encoder = ContentEncoder(config.model.lemur).eval()
    encoder.load_state_dict({k[k.index(ENCODER_KEY) + len(ENCODER_KEY):]: v for k, v in state.items() if ENCODER_KEY in k})
    (bank,) = [v for k, v in state.items() if k.endswith(BANK_WEIGHT)]
    items = np.random.default_rng(synth_cfg.seed).integers(0, synth_cfg.items, SEPARATION_ITEMS)
    rows = item_map.remap(synth.raw_ids(schema.ITEM_MAP, items))
    items, rows = items[rows != 0], rows[rows != 0]
    tokens = torch.from_numpy(load_content_tokens(layout, item_map, config.model.lemur.max_tokens))
    with torch.no_grad():
        values = encoder(tokens[torch.from_numpy(rows)])
    z = torch.nn.functional.normalize(values, dim=-1)
    cosine = (z @ z.T).numpy()
    catalogue = synth.Catalogue.build(synth_cfg)
    clusters, categories = catalogue.cluster_of(items), catalogue.category_of(items)
    same = clusters[:, None] == clusters[None, :]
    sibling = (categories[:, None] == categories[None, :]) & ~same
    off_diagonal = ~np.eye(len(items), dtype=bool)
    cached = bank[torch.from_numpy(rows)].float()
    written = cached.abs().sum(dim=1) > 0
    return {"within_cluster_cosine": float(cosine[same & off_diagonal].mean()), "across_cluster_cosine": float(cosine[~same].mean()),
            "sibling_cluster_cosine": float(cosine[sibling].mean()),
            "final_bank_staleness": float(torch.nn.functional.cosine_similarity(cached[written], values[written], dim=-1).mean()),
            "final_bank_coverage_of_sample": float(written.float().mean())}


def quality(args: argparse.Namespace, data_root: Path, runs: Path, synth_cfg: SynthConfig, true_scl_root: Path) -> dict[str, dict]:
    def job(label: str, config_file: Path, name: str, extra: list[str], root: Path = data_root) -> dict:
        run_dir = runs / name
        overrides = common_overrides(args, root, run_dir) + ["train.save_eval_scores=true"] + extra  # rows for the paired comparisons
        records, seconds = run_training(config_file, overrides, run_dir, args.nproc, args.quiet, label)
        trained = [r for r in records if "loss" in r and r.get("split") != "test"]
        bank = {f"train_{k}": trained[-1].get(k) for k in BANK_KEYS} if trained and BANK_KEYS[0] in trained[-1] else {}
        warm = next(({k: v for k, v in r.items() if k.startswith("warm_start")} for r in records if "warm_start_items" in r), {})
        check = encoder_check(latest(run_dir), data_root, synth_cfg, args.overrides + extra) if config_file == LEMUR_CONFIG else {}
        result = {"label": label, **summarize(records, seconds, run_dir), **bank, **warm, **check, "overrides": extra}
        done[name] = result
        (runs / "done.json").write_text(json.dumps(done, indent=2, default=str) + "\n")  # what finished, should a later run fail
        return result

    done: dict[str, dict] = {}
    results = {"din": job(LABELS["din"], ROOT / "configs" / "din.yaml", "din", [])}
    results["muse"] = job(LABELS["muse"], ROOT / "configs" / "muse.yaml", "muse", [])
    results["muse_true_scl"] = job(LABELS["muse_true_scl"], ROOT / "configs" / "muse.yaml", "muse_true_scl", [], true_scl_root)
    arms = args.arms.split(",")
    pretrain = job("stage 1: encoder on the contrastive loss alone", LEMUR_CONFIG, "pretrain", PRETRAIN + args.pretrain_overrides)
    encoder = [f"model.lemur.encoder_checkpoint={latest(Path(pretrain['run_dir']))}"]
    for key, pretrained, extra in (("two_stage", True, FROZEN_ONCE), ("lemur", True, []), ("lemur_scratch", False, []),
                                   ("frozen_random", False, FROZEN_ONCE)):
        if key in arms:
            results[key] = job(LABELS[key], LEMUR_CONFIG, key, extra + (encoder if pretrained else []))
            if pretrained:
                results[key]["pretrain_seconds"] = pretrain["seconds"]
    for key in filter(None, args.ablations.split(",")):
        label, extra = ABLATIONS[key]
        extra = extra if extra is not None else [f"optim.encoder_lr={args.dense_lr}", *(REENCODE_FAST if key == "fast_encoder_reencode" else NO_REENCODE)]
        pretrained = key not in FROM_SCRATCH
        results[f"ablation_{key}"] = job(f"ablation: {label}", LEMUR_CONFIG, f"ablation_{key}", (encoder if pretrained else []) + extra)
        if pretrained:
            results[f"ablation_{key}"]["pretrain_seconds"] = pretrain["seconds"]
    results["pretrain"] = pretrain
    base = results["muse"]["gauc"]
    for r in results.values():
        r["gauc_gain_vs_muse"] = (r["gauc"] - base) / base
    results["paired"] = paired_differences(results)
    return results


def cost(args: argparse.Namespace, data_root: Path) -> dict:
    """Forward + backward seconds per step in one process: MUSE, lemur from the bank (without and
    with the configured refresh), lemur encoding every distinct history item."""
    torch.set_num_threads(1)
    layout = DatasetLayout(data_root)
    maps = FeatureMaps.load(layout, "p90")
    common = [f"data.root={data_root}", f"data.batch_size={args.cost_batch_size}", "data.num_workers=0", *args.overrides]
    refresh = load_config(LEMUR_CONFIG, common).model.lemur.refresh_rows
    variants = {
        "muse": (ROOT / "configs" / "muse.yaml", []),
        "muse_gsu_in_model": (ROOT / "configs" / "muse.yaml", ["model.gsu_stage=model"]),
        "lemur_bank": (LEMUR_CONFIG, ["model.lemur.refresh_rows=0"]),
        "lemur_bank_refresh": (LEMUR_CONFIG, []),
        "lemur_history_encoded": (LEMUR_CONFIG, ["model.lemur.refresh_rows=0", "model.lemur.history_source=encoder"]),
    }
    out = {"refresh_rows": refresh}
    for name, (config_file, extra) in variants.items():
        config = load_config(config_file, common + extra)
        torch.manual_seed(args.seed)
        model = make_model(config.model, maps.table_rows())
        load_scl_table(model, maps.scl, torch.device("cpu"))
        if isinstance(model, LemurModel):
            model.targets.set_tokens(torch.from_numpy(load_content_tokens(layout, maps.of_column(schema.TARGET_ITEM), config.model.lemur.max_tokens)))
            model.targets.writer.bind(local_pieces(model.bank_table.embeddings["bank"].weight))
            model.targets.writer.clear()
            model.targets.writer.store_local(torch.arange(1, maps.table_rows()[schema.ITEM_MAP]), torch.randn(maps.table_rows()[schema.ITEM_MAP] - 1, 128),
                                             only_written=False)  # a full bank, as after the warm start
        batches = iter(ShardDataset(config.data, "train", 0, 1, maps, layout=batch_layout(config.model)))
        seconds, distinct = [], []
        for step in range(2 + args.cost_steps):
            batch = next(batches)
            features = batch.sequence_features
            history = features[schema.HIST_ITEMS].values() if schema.HIST_ITEMS in features.keys() else features[schema.TOP_ITEMS].values()
            start = time.perf_counter()
            model(batch)[0].backward()
            model.zero_grad(set_to_none=True)
            if step >= 2:
                seconds.append(time.perf_counter() - start)
                distinct.append(int(torch.unique(history[history != 0]).numel()))
        out[name] = {"step_seconds_median": statistics.median(seconds), "step_seconds": seconds,
                     "distinct_history_items_per_batch": statistics.median(distinct)}
        print(f"cost, {name}: {out[name]['step_seconds_median']:.3f} s per step of {args.cost_batch_size} "
              f"({out[name]['distinct_history_items_per_batch']:,.0f} distinct history items a batch)", flush=True)
    return out


def bank_plans(profiles: tuple[str, ...] = GPU_PROFILES) -> list[dict]:
    """configs/lemur.yaml planned offline for the full vocabulary on each profile: the bank's
    placement and bytes on the busiest rank, and that rank's whole plan against its cap."""
    rows = []
    for profile in profiles:
        config = planning.load_config_with_profile(GPU_CONFIG, profile, [])
        try:
            plan, memory = planning.plan_offline(config, config.hardware, "full")
        except MuseRecError as e:
            rows.append({"profile": profile, "fits": False, "error": str(e).splitlines()[0]})
            continue
        (bank,) = [tables["bank"] for tables in plan.plan.values() if "bank" in tables]
        element = 2 if config.model.lemur.bank_dtype == "fp16" else 4
        per_rank: dict[int, int] = {}
        for shard in bank.sharding_spec.shards:
            rank = shard.placement.rank()
            per_rank[rank] = per_rank.get(rank, 0) + shard.shard_sizes[0] * shard.shard_sizes[1] * element
        busiest = max(memory, key=lambda m: m.hbm)
        rows.append({"profile": profile, "world_size": config.hardware.world_size, "bank_sharding": bank.sharding_type,
                     "bank_kernel": bank.compute_kernel, "bank_gib_per_rank": max(per_rank.values()) / plotting.GIB,
                     "bank_gib_total": sum(per_rank.values()) / plotting.GIB, "rank_hbm_gib": busiest.hbm / plotting.GIB,
                     "rank_ddr_gib": busiest.ddr / plotting.GIB, "hbm_cap_gib": busiest.hbm_cap / plotting.GIB,
                     "fits": all(m.fits for m in memory)})
        print(f"plan {profile}: bank {rows[-1]['bank_sharding']}/{rows[-1]['bank_kernel']}, {rows[-1]['bank_gib_per_rank']:.1f} GiB a rank; "
              f"busiest rank {rows[-1]['rank_hbm_gib']:.1f} of {rows[-1]['hbm_cap_gib']:.1f} GiB", flush=True)
    return rows


PAIRED = (("lemur", "muse"), ("lemur", "two_stage"), ("two_stage", "din"), ("lemur", "lemur_scratch"), ("muse_true_scl", "muse"),
          ("muse_true_scl", "lemur"))
"""Comparisons the target names, each paired over the same test users; every ablation is also paired with "lemur"."""


def paired_differences(results: dict[str, dict]) -> list[dict]:
    """GAUC differences of the PAIRED arms (and each ablation against LEMUR end to end) with their
    paired bootstrap SE: both runs scored the same test rows (`train.save_eval_scores`)."""
    pairs = [*PAIRED, *(("lemur", key) for key in results if key.startswith("ablation_"))]
    out = []
    for a, b in pairs:
        if a in results and b in results:
            difference, se = paired_gauc_difference(*(EvalRows.load(Path(results[k]["run_dir"]) / EVAL_SCORES) for k in (a, b)))
            unpaired = float(np.hypot(results[a]["gauc_bootstrap_se"], results[b]["gauc_bootstrap_se"]))
            out.append({"a": a, "b": b, "label": f"{results[a]['label']} - {results[b]['label']}", "gauc_difference": difference,
                        "paired_se": se, "unpaired_se": unpaired})
    return out


def tables(results: dict[str, dict] | None, costs: dict, plans: list[dict], oracle: dict | None, args: argparse.Namespace) -> str:
    def value(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    lines = []
    if results:
        lines += [
            "| variant | GAUC ± SE | AUC | GAUC vs MUSE | coverage target / short / long (train) | staleness target / refresh (train) "
            "| bank staleness at eval | encoder cosine within / across / sibling clusters | time |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for key, r in results.items():
            if key in ("pretrain", "paired"):
                continue
            coverage = " / ".join(value(r.get(f"train_{k}"), ".3f") for k in BANK_KEYS[:3]) if f"train_{BANK_KEYS[0]}" in r else "-"
            staleness = " / ".join(value(r.get(f"train_{k}"), ".3f") for k in BANK_KEYS[3:]) if f"train_{BANK_KEYS[0]}" in r else "-"
            separation = " / ".join(value(r.get(k), ".3f") for k in ("within_cluster_cosine", "across_cluster_cosine", "sibling_cluster_cosine")) \
                if "within_cluster_cosine" in r else "-"
            minutes = (r["seconds"] + r.get("pretrain_seconds", 0.0)) / 60
            lines.append(f"| {r['label']} | {r['gauc']:.4f} ± {r['gauc_bootstrap_se']:.4f} | {r['auc']:.4f} | {r['gauc_gain_vs_muse'] * 100:+.2f}% "
                         f"| {coverage} | {staleness} | {value(r.get('final_bank_staleness'), '.3f')} | {separation} | {minutes:.1f} min |")
        if oracle:
            lines.append(f"| oracle (true click probability) | {oracle['gauc']:.4f} ± {oracle['gauc_bootstrap_se']:.4f} | {oracle['auc']:.4f} | - | - | - | - | - | - |")
        lines += ["", "| comparison (the same test users) | GAUC difference | paired SE | difference / paired SE | unpaired SE |", "|---|---|---|---|---|"]
        for p in results["paired"]:
            lines.append(f"| {p['label']} | {p['gauc_difference']:+.4f} | {p['paired_se']:.4f} | {p['gauc_difference'] / p['paired_se']:+.1f} "
                         f"| {p['unpaired_se']:.4f} |")
        lines.append("")
    lines += [
        f"| cost (batch {args.cost_batch_size}, forward + backward, 1 process, 1 thread) | s / step | vs MUSE |",
        "|---|---|---|",
    ]
    muse = costs["muse"]["step_seconds_median"]
    names = {"muse": "MUSE (frozen SCL, GSU in the loader, outside the timed step)",
             "muse_gsu_in_model": "MUSE, GSU in the model (1000 x 128 SCL lookup and top-K in the step)", "lemur_bank": "lemur, history from the bank",
             "lemur_bank_refresh": f"lemur, history from the bank, refresh {costs['refresh_rows']} rows",
             "lemur_history_encoded": f"lemur, encoder on every distinct history item ({costs['lemur_history_encoded']['distinct_history_items_per_batch']:,.0f} a batch)"}
    for key, label in names.items():
        lines.append(f"| {label} | {costs[key]['step_seconds_median']:.3f} | {costs[key]['step_seconds_median'] / muse:.2f}x |")
    if results:
        lines += ["", f"| training on {args.nproc} CPU ranks (whole run) | samples/s | warm start |", "|---|---|---|"]
        for key in ("muse", "lemur", "two_stage"):
            r = results.get(key, {})
            warm = "-"
            if r.get("warm_start_items"):
                rate = r.get("warm_start_items_per_second")
                warm = (f"{r['warm_start_items']:,} items ({r['warm_start_item_table_share'] * 100:.1f} % of the item table): scan "
                        f"{r['warm_start_scan_seconds']:.1f} s, encoding {r['warm_start_encode_seconds']:.1f} s ({value(rate, ',.0f')} items/s), "
                        f"save {r['warm_start_save_seconds']:.1f} s")
            lines.append(f"| {r.get('label', key)} | {value(r.get('train_samples_per_second'), ',.0f')} | {warm} |")
    if plans:
        lines += ["", "| GPU profile (configs/lemur.yaml, full vocabulary, 243 M items) | bank placement | bank GiB a rank (all ranks) "
                  "| busiest rank HBM / cap GiB | fits |", "|---|---|---|---|---|"]
        for p in plans:
            if "bank_gib_per_rank" not in p:
                lines.append(f"| {p['profile']} | - | - | - | no: {p['error'][:80]} |")
                continue
            lines.append(f"| {p['profile']} ({p['world_size']} GPUs) | {p['bank_sharding']}, {p['bank_kernel']} | {p['bank_gib_per_rank']:.1f} "
                         f"({p['bank_gib_total']:.1f}) | {p['rank_hbm_gib']:.1f} / {p['hbm_cap_gib']:.1f} | {'yes' if p['fits'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out_dir).resolve()
    data_root, runs = out / "lemur-data", out / "lemur-runs"
    synth_cfg = dataclasses.replace(SynthConfig(), seed=args.seed, train_users=args.users, test_users=args.test_users,
                                    scl_mislabel_share=args.scl_mislabel_share)
    print(f"synthetic data set with item titles ({args.users:,} train / {args.test_users:,} test users, "
          f"SCL mislabel share {args.scl_mislabel_share}) in {data_root}", flush=True)
    summary = synth.synthesize(synth_cfg, data_root, progress=not args.quiet)
    oracle = results = None
    if not args.skip_quality:
        true_scl_root = out / "lemur-data-true-scl"  # the same rows; every SCL vector around its own cluster
        synth.synthesize(dataclasses.replace(synth_cfg, scl_mislabel_share=0.0), true_scl_root, progress=not args.quiet)
        oracle = oracle_metrics(synth_cfg)
        results = quality(args, data_root, runs, synth_cfg, true_scl_root)
    costs = cost(args, data_root)
    plans = [] if args.skip_plans else bank_plans()
    table = tables(results, costs, plans, oracle, args)
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": round(time.perf_counter() - started, 1),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "args": vars(args),
        "data": summary,
        "oracle": oracle,
        "results": results,
        "cost": costs,
        "plans": plans,
        "table_markdown": table,
    }
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "lemur.json", out / "lemur.md"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md_path.write_text(f"# LEMUR on synthetic data with item titles\n\n{table}\n")
    print("\n" + table + "\n")
    print(f"results written to {json_path} and {md_path} ({report['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
