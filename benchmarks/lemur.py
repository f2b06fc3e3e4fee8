"""LEMUR on synthetic data with item titles: quality of frozen SCL (MUSE), a two-stage encoder and
end-to-end `lemur`, and what the memory bank saves per step.

Data: one synthetic set (`muse_rec.data.synth`) where a share of the SCL vectors mislead
(`--scl-mislabel-share`, synth.scl_mislabel_share: drawn around a sibling cluster of the item's
category) while every item's title names its true cluster, so the content carries click
information the frozen vectors lack.

Quality: each variant trains one epoch on `--nproc` CPU ranks through `muse-rec train` (torchrun
jobs, the same optimizer overrides for all) and is evaluated on the whole test split:
- MUSE: configs/muse.yaml, frozen SCL vectors in the GSU and ESU.
- two-stage: configs/lemur_synthetic.yaml trained on the contrastive loss only (ranking_weight 0,
  contrastive_weight 1), then its encoder frozen (train_encoder false, encoder_checkpoint) while
  the ranker trains on clicks, its bank filled by the frozen encoder.
- lemur: the same pretrained encoder, then trained end to end with the ranker (configs/
  lemur_synthetic.yaml: p = q = 1, contrastive weight 0.1): the two differ only in joint training.
- lemur from scratch: end to end from a random encoder (one epoch is little for that).
- lemur, frozen random encoder: the same machinery with train_encoder false (what training adds).
- DIN: the short sequence alone, the floor every long-sequence variant should clear.
Bank coverage and staleness are read from the last training record of each lemur run. Collapse
diagnostic: each run's final encoder encodes `SEPARATION_ITEMS` catalogue items, and the mean cosine
between items of one semantic cluster is set against the mean across clusters (an encoder that
maps every item to one direction shows 1.0 / 1.0; the SCL vectors show about 0.73 / 0.0).

Cost: one process, the lemur model on real batches of `--cost-batch-size`, timed forward +
backward (median of `--cost-steps` after two warm-up steps) with the history read from the
memory bank against encoding every distinct history item each step (history_source encoder).

    python benchmarks/lemur.py [--users 3000] [--test-users 1500] [--scl-mislabel-share 0.3]
        [--nproc 2] [--batch-size 250] [--cost-batch-size 250] [--cost-steps 5] [--out-dir benchmarks/results]

Prints a table and saves <out-dir>/lemur.json and lemur.md.
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

from quality import common_overrides, run_training, summarize  # noqa: E402

from muse_rec.config import SynthConfig, load_config  # noqa: E402
from muse_rec.data import schema  # noqa: E402
from muse_rec.data import synth  # noqa: E402
from muse_rec.data.content import load_content_tokens  # noqa: E402
from muse_rec.data.feature_map import FeatureMaps  # noqa: E402
from muse_rec.data.layout import DatasetLayout  # noqa: E402
from muse_rec.data.loader import ShardDataset  # noqa: E402
from muse_rec.distributed.table_weights import load_scl_table, local_pieces  # noqa: E402
from muse_rec.model.encoder import ContentEncoder  # noqa: E402
from muse_rec.model.lemur import LemurModel  # noqa: E402
from muse_rec.batch import batch_layout  # noqa: E402
from muse_rec.train.checkpoint import latest  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LEMUR_CONFIG = ROOT / "configs" / "lemur_synthetic.yaml"
BANK_KEYS = ("bank_coverage_target", "bank_coverage_short", "bank_coverage_long", "bank_staleness_cosine")
SEPARATION_ITEMS = 4000
ENCODER_KEY = "targets.encoder."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=3000, help="train users (default 3000)")
    p.add_argument("--test-users", type=int, default=1500, help="test users (default 1500)")
    p.add_argument("--scl-mislabel-share", type=float, default=0.3, help="share of misleading SCL vectors (default 0.3)")
    p.add_argument("--seed", type=int, default=42, help="seed of the data and of every model (default 42)")
    p.add_argument("--nproc", type=int, default=2, help="ranks per training job (default 2)")
    p.add_argument("--batch-size", type=int, default=250, help="samples per batch on each rank (default 250)")
    p.add_argument("--dense-lr", type=float, default=2e-3, help="AdamW learning rate, every variant (default 2e-3)")
    p.add_argument("--sparse-lr", type=float, default=0.05, help="CPU embedding optimizer learning rate (default 0.05)")
    p.add_argument("--cost-batch-size", type=int, default=250, help="batch of the cost measurement (default 250)")
    p.add_argument("--cost-steps", type=int, default=5, help="timed steps per cost variant (default 5)")
    p.add_argument("--skip-quality", action="store_true", help="only the cost measurement")
    p.add_argument("--out-dir", default=str(RESULTS), help="results directory (default benchmarks/results)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override passed to every training job (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars from the training jobs")
    return p.parse_args(argv)


def encoder_separation(path: Path, data_root: Path, synth_cfg: SynthConfig) -> dict[str, float]:
    """Mean cosine of the checkpoint's encoder outputs within a semantic cluster and across clusters,
    over `SEPARATION_ITEMS` catalogue items (read in one process, no process group)."""
    config = load_config(LEMUR_CONFIG, [f"data.root={data_root}"])
    layout = DatasetLayout(data_root)
    item_map = FeatureMaps.load(layout, "p90").of_column(schema.TARGET_ITEM)
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    keys = [k for k in meta if k.startswith("model.") and ENCODER_KEY in k]
    state = {k: torch.empty(meta[k].size, dtype=meta[k].properties.dtype) for k in keys}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    encoder = ContentEncoder(config.model.lemur).eval()
    encoder.load_state_dict({k[k.index(ENCODER_KEY) + len(ENCODER_KEY):]: v for k, v in state.items()})
    items = np.random.default_rng(synth_cfg.seed).integers(0, synth_cfg.items, SEPARATION_ITEMS)
    rows = item_map.remap(synth.raw_ids(schema.ITEM_MAP, items))
    items, rows = items[rows != 0], rows[rows != 0]
    tokens = torch.from_numpy(load_content_tokens(layout, item_map, config.model.lemur.max_tokens))
    with torch.no_grad():
        z = torch.nn.functional.normalize(encoder(tokens[torch.from_numpy(rows)]), dim=-1)
    cosine = (z @ z.T).numpy()
    clusters = synth.Catalogue.build(synth_cfg).cluster_of(items)
    same = clusters[:, None] == clusters[None, :]
    off_diagonal = ~np.eye(len(items), dtype=bool)
    return {"within_cluster_cosine": float(cosine[same & off_diagonal].mean()), "across_cluster_cosine": float(cosine[~same].mean())}


def quality(args: argparse.Namespace, data_root: Path, runs: Path, synth_cfg: SynthConfig) -> dict[str, dict]:
    def job(label: str, config_file: Path, name: str, extra: list[str]) -> dict:
        run_dir = runs / name
        records, seconds = run_training(config_file, common_overrides(args, data_root, run_dir) + extra, run_dir, args.nproc, args.quiet, label)
        trained = [r for r in records if r.get("split") != "test"]
        bank = {f"train_{k}": trained[-1].get(k) for k in BANK_KEYS} if trained and BANK_KEYS[0] in trained[-1] else {}
        encoder = encoder_separation(latest(run_dir), data_root, synth_cfg) if config_file == LEMUR_CONFIG else {}
        return {**summarize(records, seconds, run_dir), **bank, **encoder}

    results = {"din": job("DIN (short sequence only)", ROOT / "configs" / "din.yaml", "din", [])}
    results["muse"] = job("MUSE (frozen SCL)", ROOT / "configs" / "muse.yaml", "muse", [])
    pretrain = job("two-stage, stage 1: encoder on the contrastive loss only", LEMUR_CONFIG, "two_stage_pretrain",
                   ["model.lemur.ranking_weight=0", "model.lemur.contrastive_weight=1"])
    encoder = latest(Path(pretrain["run_dir"]))
    results["two_stage"] = job("two-stage, stage 2: frozen encoder, ranker on clicks", LEMUR_CONFIG, "two_stage",
                               ["model.lemur.train_encoder=false", f"model.lemur.encoder_checkpoint={encoder}"])
    results["two_stage"]["pretrain_seconds"] = pretrain["seconds"]
    results["lemur"] = job("lemur: the same pretrained encoder, then end to end", LEMUR_CONFIG, "lemur",
                           [f"model.lemur.encoder_checkpoint={encoder}"])
    results["lemur"]["pretrain_seconds"] = pretrain["seconds"]
    results["lemur_scratch"] = job("lemur from a random encoder, end to end", LEMUR_CONFIG, "lemur_scratch", [])
    results["lemur_frozen_random"] = job("lemur with its random encoder frozen", LEMUR_CONFIG, "lemur_frozen_random",
                                         ["model.lemur.train_encoder=false"])
    base = results["muse"]["gauc"]
    for r in results.values():
        r["gauc_gain_vs_muse"] = (r["gauc"] - base) / base
    return results


def cost(args: argparse.Namespace, data_root: Path) -> dict:
    """Forward + backward seconds per step, history from the bank vs encoded every step."""
    torch.set_num_threads(1)
    layout = DatasetLayout(data_root)
    maps = FeatureMaps.load(layout, "p90")
    out = {}
    for source in ("bank", "encoder"):
        config = load_config(LEMUR_CONFIG, [f"data.root={data_root}", f"data.batch_size={args.cost_batch_size}", "data.num_workers=0",
                                            f"model.lemur.history_source={source}"])
        torch.manual_seed(args.seed)
        model = LemurModel(config.model, maps.table_rows())
        model.targets.set_tokens(torch.from_numpy(load_content_tokens(layout, maps.of_column(schema.TARGET_ITEM), config.model.lemur.max_tokens)))
        load_scl_table(model, maps.scl, torch.device("cpu"))
        model.targets.writer.bind(local_pieces(model.bank_table.embeddings["bank"].weight))
        model.targets.writer.clear()
        batches = iter(ShardDataset(config.data, "train", 0, 1, maps, layout=batch_layout(config.model)))
        seconds, distinct = [], []
        for step in range(2 + args.cost_steps):
            batch = next(batches)
            history = batch.sequence_features[schema.HIST_ITEMS].values()
            start = time.perf_counter()
            model(batch)[0].backward()
            model.zero_grad(set_to_none=True)
            if step >= 2:
                seconds.append(time.perf_counter() - start)
                distinct.append(int(torch.unique(history[history != 0]).numel()))
        out[source] = {"step_seconds_median": statistics.median(seconds), "step_seconds": seconds,
                       "distinct_history_items_per_batch": statistics.median(distinct)}
        print(f"cost, history from {source}: {out[source]['step_seconds_median']:.3f} s per step of {args.cost_batch_size} "
              f"({out[source]['distinct_history_items_per_batch']:,.0f} distinct history items a batch)", flush=True)
    out["saving_ratio"] = out["encoder"]["step_seconds_median"] / out["bank"]["step_seconds_median"]
    return out


def tables(results: dict[str, dict] | None, costs: dict, args: argparse.Namespace) -> str:
    def value(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    lines = []
    if results:
        lines += [
            "| variant | GAUC | AUC | logloss | GAUC vs MUSE | bank coverage target / short / long (train) | staleness (train) "
            "| encoder cosine within / across clusters | time |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        names = {"din": "DIN (short sequence only)", "muse": "MUSE (frozen SCL)", "two_stage": "two-stage (contrastive pretrain, then frozen)",
                 "lemur": "lemur (contrastive pretrain, then end to end)", "lemur_scratch": "lemur (random init, end to end)",
                 "lemur_frozen_random": "lemur machinery, random encoder frozen"}
        for key, r in results.items():
            coverage = " / ".join(value(r.get(f"train_{k}"), ".3f") for k in BANK_KEYS[:3]) if f"train_{BANK_KEYS[0]}" in r else "-"
            separation = " / ".join(value(r.get(k), ".3f") for k in ("within_cluster_cosine", "across_cluster_cosine")) if "within_cluster_cosine" in r else "-"
            minutes = (r["seconds"] + r.get("pretrain_seconds", 0.0)) / 60
            lines.append(f"| {names[key]} | {r['gauc']:.4f} | {r['auc']:.4f} | {r['logloss']:.4f} | {r['gauc_gain_vs_muse'] * 100:+.2f}% "
                         f"| {coverage} | {value(r.get('train_bank_staleness_cosine'), '.3f')} | {separation} | {minutes:.1f} min |")
        lines.append("")
    lines += [
        f"| history representations (batch {args.cost_batch_size}, forward + backward, 1 core) | s / step | distinct history items encoded |",
        "|---|---|---|",
        f"| memory bank (lemur) | {costs['bank']['step_seconds_median']:.3f} | 0 |",
        f"| encoder on every distinct history item | {costs['encoder']['step_seconds_median']:.3f} | {costs['encoder']['distinct_history_items_per_batch']:,.0f} |",
        f"| saving | {costs['saving_ratio']:.1f}x | |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out_dir).resolve()
    data_root, runs = out / "lemur-data", out / "lemur-runs"
    synth_cfg = dataclasses.replace(SynthConfig(), seed=args.seed, train_users=args.users, test_users=args.test_users,
                                    scl_mislabel_share=args.scl_mislabel_share)
    print(f"synthetic data set with item titles ({args.users:,} train / {args.test_users:,} test users, "
          f"SCL mislabel share {args.scl_mislabel_share}) in {data_root}", flush=True)
    summary = synth.synthesize(synth_cfg, data_root, progress=not args.quiet)
    results = None if args.skip_quality else quality(args, data_root, runs, synth_cfg)
    costs = cost(args, data_root)
    table = tables(results, costs, args)
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "args": vars(args),
        "data": summary,
        "results": results,
        "cost": costs,
        "table_markdown": table,
    }
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "lemur.json", out / "lemur.md"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md_path.write_text(f"# LEMUR on synthetic data with item titles\n\n{table}\n")
    print("\n" + table + "\n")
    print(f"results written to {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
