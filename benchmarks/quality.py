"""Model quality: MUSE, SIM-soft, SIM-hard and DIN trained on one synthetic set, a table like the paper's.

One synthetic data set (`muse_rec.data.synth.synthesize`) is written once under
<out-dir>/quality-data/. Its generative model is the synth section of --synth-config, by default
configs/synthetic_separating.yaml: evidence of the user's interests that is scarce, old, cut across
categories and told through many different items, so that what each GSU retrieves of it decides
the GAUC (the synth module doc, "The separating preset", says why each method lands where it does).
`--synth-config builtin` takes SynthConfig's defaults instead, the classic model on which MUSE,
SIM-Soft and SIM-Hard all reach the oracle. Only the sizes and the seed are set here. Each method then
trains one epoch and is evaluated on the test split by `muse-rec train`, launched per method as its
own job on `--nproc` CPU ranks through `python -m torch.distributed.run` with the method's
configs/<method>.yaml (DIN reads the last 50 behaviours, data.long_seq_len=50; the others the
1000-long sequence) and the same overrides for every method: data root, batch size, seed, optimizer
settings. The jobs import this checkout's muse_rec (its root goes first on their PYTHONPATH). The
test metrics are read back from the last record of each run's metrics.jsonl
(<out-dir>/quality-runs/<method>/; a run directory is emptied first, so no run resumes from an older
checkpoint).

The table holds exact GAUC (the paper's metric, computed over the whole test split) with its
bootstrap standard error over the test users, exact AUC, the reference code's per-batch GAUC,
logloss, and the gain over DIN both as (gauc - gauc_din) / gauc_din and as RelaImpr = (gauc - 0.5) /
(gauc_din - 0.5) - 1, beside the paper's Open-Source-1k GAUCs. An "oracle" row scores every test
impression with its true click probability from the generative model (recomputed from the same
seeded draws as the data), the ceiling any model can reach on this set. The separation check is the
target of issue #13: MUSE > SIM-Soft > SIM-Hard > DIN, each gap above two bootstrap SEs, and MUSE at
least 0.01 GAUC below the oracle. Everything is printed and saved to <out-dir>/quality.json,
<out-dir>/quality.md and <out-dir>/quality.png (GAUC bars with +-1 SE error bars, beside the
paper's GAUCs); `--replot quality.json` redraws the figure alone.

Optimizer: one setting for every method, chosen on a small set of the classic model (1,500 / 800
users, DIN and MUSE): batch 250 per rank, dense AdamW 2e-3, CPU embedding row-wise Adagrad 0.05. The
paper's dense 2e-4 underfits the few hundred steps of a small CPU epoch (MUSE logloss 0.43 at batch
250 and 0.58 at batch 1000 against 0.27 here; DIN's GAUC 0.55 and 0.51 against 0.66); 1e-3 and 5e-3
were within noise of 2e-3. On CPU the tables are trained by fbgemm's row-wise Adagrad
(`optim.sparse_cpu_lr`), not the reference's lazy Adam, which fbgemm lacks on CPU.

    python benchmarks/quality.py [--users 6000] [--test-users 4000] [--nproc 2] [--batch-size 250]
        [--methods muse,sim_soft,sim_hard,din] [--seed 42] [--dense-lr 2e-3] [--sparse-lr 0.05]
        [--synth-config configs/synthetic_separating.yaml | builtin] [--synth-set KEY=VALUE ...]
        [--out-dir benchmarks/results] [--set KEY=VALUE ...] [--quiet] [--replot QUALITY_JSON]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: import the checkout's muse_rec
    sys.path.insert(0, str(ROOT))
if str(ROOT / "benchmarks") not in sys.path:  # imported (tests): plotting sits beside this file
    sys.path.insert(0, str(ROOT / "benchmarks"))

import plotting  # noqa: E402  (benchmarks/plotting.py, beside this script)
from muse_rec.config import SynthConfig, load_config  # noqa: E402
from muse_rec.data import schema  # noqa: E402
from muse_rec.data import synth  # noqa: E402
from muse_rec.train.metrics import GAUC_BOOTSTRAP_DRAWS, exact_auc, exact_gauc, gauc_bootstrap_se, logloss  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SEPARATING = ROOT / "configs" / "synthetic_separating.yaml"
METHODS = ("muse", "sim_soft", "sim_hard", "din")
LABELS = {"muse": "MUSE", "sim_soft": "SIM-Soft", "sim_hard": "SIM-Hard", "din": "DIN"}
GSU = {
    "muse": "SCL cosine top-50 of 1000",
    "sim_soft": "ID-embedding cosine top-50 of 1000",
    "sim_hard": "latest 50 of the target's category",
    "din": "none (last 50 only)",
}
PAPER_GAUC = {"din": 0.6082, "sim_hard": 0.6139, "sim_soft": 0.6135, "muse": 0.6154}  # Open-Source-1k, 1 epoch
"""shared/spec/muse-model.md, "Paper results"."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=6000, help="train users (6..16 impressions each; default 6000, about 66k rows)")
    p.add_argument("--test-users", type=int, default=4000, help="test users (new users; default 4000, about 44k rows)")
    p.add_argument("--nproc", type=int, default=2, help="ranks per training job (default 2)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, run in this order (default {','.join(METHODS)})")
    p.add_argument("--batch-size", type=int, default=250, help="samples per batch on each rank (default 250)")
    p.add_argument("--seed", type=int, default=42, help="seed of the data set and of every model's initialisation (default 42)")
    p.add_argument("--dense-lr", type=float, default=2e-3, help="AdamW learning rate of the dense parameters, every method (default 2e-3)")
    p.add_argument("--sparse-lr", type=float, default=0.05,
                   help="learning rate of the CPU embedding optimizer (optim.sparse_cpu_lr, row-wise Adagrad), every "
                        "method (default 0.05); CUDA runs keep optim.sparse_lr (Adam, reference 2e-3) unless --set")
    p.add_argument("--out-dir", default=str(RESULTS), help="results directory (default benchmarks/results)")
    p.add_argument("--synth-config", default=str(SEPARATING),
                   help="YAML whose synth: section is the generative model (sizes and seed replaced by --users, "
                        f"--test-users, --seed); default {SEPARATING.relative_to(ROOT)}; 'builtin' for SynthConfig's "
                        "defaults (the classic model, on which the long-sequence methods all reach the ceiling)")
    p.add_argument("--synth-set", dest="synth_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override of a synth key (without the synth. prefix), after --synth-config (repeatable)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override passed to every method's job (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bars from the training jobs")
    p.add_argument("--replot", metavar="QUALITY_JSON", help="only redraw the figure of an earlier run's quality.json (beside it)")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        p.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    return args


# -- data ------------------------------------------------------------------------------------------
def synth_config(args: argparse.Namespace) -> SynthConfig:
    """The generative model of --synth-config (and --synth-set); the sizes and the seed from the arguments."""
    path = None if args.synth_config == "builtin" else args.synth_config
    base = load_config(path, [f"synth.{item}" for item in args.synth_overrides]).synth
    return dataclasses.replace(base, seed=args.seed, train_users=args.users, test_users=args.test_users)


def oracle_metrics(config: SynthConfig) -> dict:
    """Test metrics of the true click probabilities: the test split's blocks drawn again from the
    same seeded streams (`synth.split_blocks`, so the rows and clicks are the shard's)."""
    catalogue = synth.Catalogue.build(config)
    users, probabilities, clicks = [], [], []
    for block in synth.split_blocks(catalogue, "test"):
        probabilities.append(block.click_probability)
        clicks.append(block.clicks)
        users.append(synth.raw_ids(schema.USER, block.users)[block.target_owner])
    user_ids, scores, labels = np.concatenate(users), np.concatenate(probabilities), np.concatenate(clicks)
    gauc, gauc_users = exact_gauc(user_ids, scores.astype(np.float32), labels)
    return {
        "auc": exact_auc(scores.astype(np.float32), labels),
        "gauc": gauc,
        "gauc_users": gauc_users,
        "gauc_bootstrap_se": gauc_bootstrap_se(user_ids, scores.astype(np.float32), labels),
        "logloss": logloss(scores, labels),
        "rows": int(labels.size),
        "click_rate": float(labels.mean()),
    }


# -- training jobs ---------------------------------------------------------------------------------
def common_overrides(args: argparse.Namespace, data_root: Path, run_dir: Path) -> list[str]:
    """Every method gets the same overrides (only its config file's method and sequence length differ)."""
    return [
        f"data.root={data_root}",
        f"data.batch_size={args.batch_size}",
        f"train.seed={args.seed}",
        f"train.out={run_dir}",
        "train.resume=false",
        f"optim.dense_lr={args.dense_lr}",
        f"optim.sparse_cpu_lr={args.sparse_lr}",
        f"train.eval_gauc_se_draws={GAUC_BOOTSTRAP_DRAWS}",  # each method's GAUC gets its bootstrap SE
        *args.overrides,
    ]


def run_training(config_file: Path, overrides: list[str], run_dir: Path, nproc: int, quiet: bool, label: str) -> tuple[list[dict], float]:
    """`muse-rec train` as its own torchrun job in a fresh run directory (a stale checkpoint would be
    resumed and metrics.jsonl appended to); returns the metrics.jsonl records and the seconds taken."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    load_config(config_file, overrides)  # fail here, not in the ranks, on a bad override
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "-m", "muse_rec.cli", "train", *(["--quiet"] if quiet else []), "--config", str(config_file), *overrides,
    ]
    print(f"\n=== {label}: {' '.join(command[1:])}", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    returncode = subprocess.run(command, cwd=ROOT, env=env, check=False).returncode
    seconds = time.perf_counter() - start
    if returncode != 0:
        raise SystemExit(f"{label}: training job failed with exit status {returncode} (output above)")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if records[-1].get("split") != "test":
        raise SystemExit(f"{label}: the last record of {run_dir / 'metrics.jsonl'} is not the test evaluation: {records[-1]}")
    test = records[-1]
    print(f"=== {label} done in {seconds / 60:.1f} min ({test['step']} steps): GAUC {test['gauc']:.4f}  AUC {test['auc']:.4f}  "
          f"logloss {test['logloss']:.4f}", flush=True)
    return records, seconds


def summarize(records: list[dict], seconds: float, run_dir: Path) -> dict:
    """Test metrics plus what the run took, from a run's metrics.jsonl records."""
    test = records[-1]
    train_records = [r for r in records if "loss" in r and r.get("split") != "test"]
    return {
        "seconds": round(seconds, 1),
        "train_steps": test["step"],
        "last_train_loss": train_records[-1]["loss"] if train_records else None,
        "train_samples_per_second": round(train_records[-1]["samples_per_second"], 1) if train_records else None,
        "run_dir": str(run_dir),
        **{k: v for k, v in test.items() if k not in ("step", "split")},
    }


def run_method(args: argparse.Namespace, method: str, data_root: Path, runs: Path) -> dict:
    config_file = ROOT / "configs" / f"{method}.yaml"
    run_dir = runs / method
    overrides = common_overrides(args, data_root, run_dir)
    records, seconds = run_training(config_file, overrides, run_dir, args.nproc, args.quiet, LABELS[method])
    config = load_config(config_file, overrides)
    return {"method": method, "gsu": GSU[method], "long_seq_len": config.data.long_seq_len, **summarize(records, seconds, run_dir)}


# -- the target: separation without a ceiling -----------------------------------------------------
ORDER = ("muse", "sim_soft", "sim_hard", "din")
"""The order the paper's argument predicts, best first (shared/spec/muse-model.md; issue #13)."""
GAP_SES = 2.0
"""Each neighbouring gap must exceed this many bootstrap SEs (the larger SE of the two methods)."""
CEILING_MARGIN = 0.01
"""MUSE must stay at least this far (GAUC) below the oracle: a ceiling would hide a regression."""


def separation(results: dict[str, dict], oracle: dict) -> dict | None:
    """Whether the methods separate as the paper says (None unless all four ran): MUSE > SIM-Soft >
    SIM-Hard > DIN, each gap above GAP_SES bootstrap SEs, and MUSE CEILING_MARGIN below the oracle."""
    if not all(method in results for method in ORDER):
        return None
    gaps = []
    for better, worse in zip(ORDER, ORDER[1:]):
        gap = results[better]["gauc"] - results[worse]["gauc"]
        se = max(results[better]["gauc_bootstrap_se"], results[worse]["gauc_bootstrap_se"])
        gaps.append({"better": better, "worse": worse, "gap": gap, "se": se, "gap_in_se": gap / se, "ok": gap > GAP_SES * se})
    below = oracle["gauc"] - results["muse"]["gauc"]
    ceiling_ok = below >= CEILING_MARGIN
    return {"gaps": gaps, "muse_below_oracle": below, "ceiling_ok": ceiling_ok, "ok": ceiling_ok and all(g["ok"] for g in gaps)}


def separation_text(check: dict | None) -> str:
    if check is None:
        return f"separation: not checked (needs all of {', '.join(ORDER)})"
    gaps = "; ".join(
        f"{LABELS[g['better']]} - {LABELS[g['worse']]} {g['gap']:+.4f} ({g['gap_in_se']:.1f} SE)" for g in check["gaps"]
    )
    verdict = "MET" if check["ok"] else "NOT MET"
    return (f"separation target {verdict}: {gaps} (each must exceed {GAP_SES:g} SE); MUSE {check['muse_below_oracle']:.4f} "
            f"below the oracle (must be >= {CEILING_MARGIN})")


# -- figure ----------------------------------------------------------------------------------------
def plot(report: dict, path: Path) -> Path:
    """GAUC of each method and of the oracle with +-1 bootstrap SE, beside the paper's GAUCs."""
    results, oracle, setup = report["results"], report["oracle"], report["setup"]
    methods = list(results)
    fig, (ax, paper_ax) = plotting.figure(1, 2, 5.4, 4.2)
    names = [LABELS[m] for m in methods] + ["oracle"]
    values = [results[m]["gauc"] for m in methods] + [oracle["gauc"]]
    errors = [results[m]["gauc_bootstrap_se"] for m in methods] + [oracle["gauc_bootstrap_se"]]
    colors = [plotting.COLORS[ORDER.index(m) if m in ORDER else 4] for m in methods] + ["0.6"]
    x = list(range(len(names)))
    ax.bar(x, [v - 0.5 for v in values], 0.7, bottom=0.5, yerr=errors, capsize=5, color=colors, edgecolor="black", linewidth=0.5)
    ax.axhline(oracle["gauc"], color="0.4", linestyle="--", linewidth=1)
    for xi, value, error in zip(x, values, errors):
        ax.text(xi, value + error + 0.004, f"{value:.3f}", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(x, names)
    ax.set_ylim(min(0.5, min(values) - 0.03), max(values) + 0.04)  # a model below chance shows as a bar down from 0.5
    ax.set_ylabel("test GAUC ± 1 bootstrap SE (axis from 0.5)")
    ax.set_title(f"this benchmark: {setup['users']:,} train / {setup['test_users']:,} test users,\n"
                 f"1 epoch, {setup['nproc']} CPU ranks, same optimizer for all", fontsize=10)
    paper = [m for m in ORDER if m in results]
    paper_ax.bar(range(len(paper)), [PAPER_GAUC[m] for m in paper], 0.7, color=[plotting.COLORS[ORDER.index(m)] for m in paper],
                 edgecolor="black", linewidth=0.5)
    for xi, m in enumerate(paper):
        paper_ax.text(xi, PAPER_GAUC[m] + 0.0003, f"{PAPER_GAUC[m]:.4f}", ha="center", va="bottom", fontsize=9)
    paper_ax.set_xticks(range(len(paper)), [LABELS[m] for m in paper])
    paper_ax.set_ylim(0.605, 0.618)
    paper_ax.set_ylabel("GAUC (axis from 0.605)")
    paper_ax.set_title("paper, Open-Source-1k (TAOBAO-MM),\n1 epoch, no error bars published", fontsize=10)
    check = report.get("separation")
    title = f"GAUC of MUSE and its baselines, generative model {Path(setup.get('synth_config', '?')).name}"
    if check is not None:
        gaps = ", ".join(f"{g['gap_in_se']:.1f}" for g in check["gaps"])
        title += f"\nneighbour gaps {gaps} SE; MUSE {check['muse_below_oracle']:.3f} below the oracle"
    return plotting.save(fig, path, title)


# -- table -----------------------------------------------------------------------------------------
def add_gains(results: dict[str, dict]) -> None:
    base = results.get("din")
    for r in results.values():
        if base is None:
            r["gauc_gain_vs_din"] = r["relaimpr_vs_din"] = None
            continue
        r["gauc_gain_vs_din"] = (r["gauc"] - base["gauc"]) / base["gauc"]
        r["relaimpr_vs_din"] = (r["gauc"] - 0.5) / (base["gauc"] - 0.5) - 1.0


def paper_gains(method: str) -> tuple[float, float]:
    din = PAPER_GAUC["din"]
    g = PAPER_GAUC[method]
    return (g - din) / din, (g - 0.5) / (din - 0.5) - 1.0


def markdown_table(results: dict[str, dict], oracle: dict | None) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 100:+.2f}%"

    lines = [
        "| method | GSU | seq | GAUC ± SE | AUC | ref. batch GAUC | logloss | GAUC gain vs DIN | RelaImpr vs DIN "
        "| paper GAUC | paper gain / RelaImpr | train+eval |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, r in results.items():
        paper_gain, paper_rela = paper_gains(method)
        paper = f"{pct(paper_gain)} / {pct(paper_rela)}" if method != "din" else "-"
        lines.append(
            f"| {LABELS[method]} | {r['gsu']} | {r['long_seq_len']} | {r['gauc']:.4f} ± {r['gauc_bootstrap_se']:.4f} | {r['auc']:.4f} "
            f"| {r['reference_batch_gauc']:.4f} | {r['logloss']:.4f} | {pct(r['gauc_gain_vs_din'])} "
            f"| {pct(r['relaimpr_vs_din'])} | {PAPER_GAUC[method]:.4f} | {paper} | {r['seconds'] / 60:.1f} min |"
        )
    if oracle is not None:
        din = results.get("din")
        gain = rela = None
        if din is not None:
            gain = (oracle["gauc"] - din["gauc"]) / din["gauc"]
            rela = (oracle["gauc"] - 0.5) / (din["gauc"] - 0.5) - 1.0
        lines.append(
            f"| oracle (true click probability) | - | - | {oracle['gauc']:.4f} ± {oracle['gauc_bootstrap_se']:.4f} | {oracle['auc']:.4f} | - "
            f"| {oracle['logloss']:.4f} | {pct(gain)} | {pct(rela)} | - | - | - |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        report = json.loads(Path(args.replot).read_text())
        print(f"figure written to {plot(report, Path(args.replot).with_suffix('.png'))}")
        return 0
    out = Path(args.out_dir).resolve()
    data_root, runs = out / "quality-data", out / "quality-runs"
    started = time.perf_counter()
    synth_cfg = synth_config(args)
    print(f"synthetic data set ({args.users:,} train users, {args.test_users:,} test users, seed {args.seed}) in {data_root}", flush=True)
    t0 = time.perf_counter()
    summary = synth.synthesize(synth_cfg, data_root, progress=not args.quiet)
    synth_seconds = time.perf_counter() - t0
    print(f"data ready in {synth_seconds:.0f} s: {json.dumps(summary, default=str)}", flush=True)
    t0 = time.perf_counter()
    oracle = oracle_metrics(synth_cfg)
    print(f"oracle (true click probabilities) on the test split: GAUC {oracle['gauc']:.4f} "
          f"(bootstrap SE over test users {oracle['gauc_bootstrap_se']:.4f})  AUC {oracle['auc']:.4f} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)

    results: dict[str, dict] = {}
    for method in args.methods:
        results[method] = run_method(args, method, data_root, runs)
    add_gains(results)
    check = separation(results, oracle)
    table = markdown_table(results, oracle)
    total = time.perf_counter() - started
    setup = {
        "users": args.users,
        "test_users": args.test_users,
        "nproc": args.nproc,
        "batch_size_per_rank": args.batch_size,
        "seed": args.seed,
        "dense_optimizer": f"AdamW lr {args.dense_lr} (weight decay and betas from configs/<method>.yaml)",
        "sparse_optimizer": f"CPU: {load_config().optim.sparse_cpu} lr {args.sparse_lr} (CUDA: fused Adam, optim.sparse_lr)",
        "extra_overrides": args.overrides,
        "synth_config": args.synth_config,
        "synth_overrides": args.synth_overrides,
        "synth": dataclasses.asdict(synth_cfg),
        "data_root": str(data_root),
    }
    note = (
        f"One epoch on {summary['splits']['train']['rows']:,} train rows (test {summary['splits']['test']['rows']:,}), evaluated on the whole test split (exact GAUC, "
        "users with one class skipped). Paper columns: Open-Source-1k (TAOBAO-MM), not this synthetic set. "
        f"± SE: bootstrap standard error of each GAUC over the test users (per-user AUCs fixed, {GAUC_BOOTSTRAP_DRAWS} resamples); "
        "differences between two models are less noisy than that, their errors being correlated."
    )
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "setup": setup,
        "data": summary,
        "synth_seconds": round(synth_seconds, 1),
        "total_seconds": round(total, 1),
        "oracle": oracle,
        "results": results,
        "separation": check,
        "paper_gauc": PAPER_GAUC,
        "table_markdown": table,
    }
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = out / "quality.json", out / "quality.md", out / "quality.png"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md_path.write_text(
        "# Model quality on synthetic data\n\n"
        f"{args.users:,} train users / {args.test_users:,} test users, seed {args.seed}, {args.nproc} ranks x batch "
        f"{args.batch_size}, {setup['dense_optimizer']}, sparse {setup['sparse_optimizer']}, generative model "
        f"{args.synth_config}. {note}\n\n{table}\n\n{separation_text(check)}.\n\n"
        f"Total time {total / 60:.1f} min (data {synth_seconds:.0f} s).\n"
    )
    plot(report, png_path)
    print("\n" + table + "\n")
    print(note)
    print(separation_text(check))
    print(f"total {total / 60:.1f} min")
    print(f"results written to {json_path}, {md_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
