"""`muse-rec`: one entry point, one subcommand per job. Thin: parse, build from config, call one function."""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

from muse_rec.config import Config, describe, load_config
from muse_rec.errors import MuseRecError

log = logging.getLogger("muse_rec")


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def cmd_config(args: argparse.Namespace) -> None:
    print("\n".join(describe(_config(args))))


def cmd_synth(args: argparse.Namespace) -> None:
    from muse_rec.data.synth import synthesize

    config = _config(args)
    out = Path(args.out or config.data.root)
    summary = synthesize(config.synth, out, progress=not args.quiet, force=args.force)
    print(json.dumps(summary, indent=2))
    print(f"synthetic data set written to {out.resolve()}")


def cmd_prepare(args: argparse.Namespace) -> None:
    from muse_rec.data.prepare import prepare

    summary = prepare(
        args.raw, args.out, coverage=args.coverage, strict=args.strict,
        rows_per_shard=args.rows_per_shard, row_group_rows=args.row_group_rows, progress=not args.quiet, force=args.force,
    )
    print(json.dumps(summary, indent=2, default=str))
    print(f"prepared data set written to {Path(args.out).resolve()}")


def cmd_download(args: argparse.Namespace) -> None:
    from muse_rec.data.download import download

    splits = tuple(s for s in args.splits.split(",") if s)
    summary = download(
        args.dest, vocab=args.vocab, splits=splits, max_shards=args.max_shards, raw=args.raw, progress=not args.quiet, force=args.force
    )
    print(json.dumps(summary, indent=2, default=str))
    print(f"TAOBAO-MM files are in {Path(args.dest).resolve()}")


def cmd_verify(args: argparse.Namespace) -> int:
    from muse_rec.data.verify import verify

    findings = verify(args.root, strict=args.strict, deep=args.deep, progress=not args.quiet)
    for finding in findings:
        print(f"{finding.level.upper():7} {finding.path}: {finding.message}")
    errors = sum(f.level == "error" for f in findings)
    print(f"{args.root}: {errors} error(s), {len(findings) - errors} warning(s)")
    return 1 if errors else 0


def cmd_stream(args: argparse.Namespace) -> None:
    from muse_rec.data.stream import format_summary, stream_split

    config = _config(args)
    for split in args.splits.split(","):
        print(format_summary(stream_split(config.data, split, progress=not args.quiet)))


def _config_on_hardware(args: argparse.Namespace) -> Config:
    """The config with the `--hardware` profile (if any) merged in before the overrides, and the
    `--plan` file (if any) as `sharding.plan`."""
    from muse_rec.distributed.planning import load_config_with_profile

    config = load_config_with_profile(args.config, args.hardware, args.overrides) if args.hardware else _config(args)
    if getattr(args, "plan", None):
        config.sharding.plan = args.plan
    return config


def cmd_train(args: argparse.Namespace) -> None:
    from muse_rec.train.loop import shutdown_distributed, train

    metrics = train(_config_on_hardware(args), progress=not args.quiet)
    shutdown_distributed()
    if metrics["rank"] == 0:
        print(format_metrics(metrics))


def cmd_eval(args: argparse.Namespace) -> None:
    from muse_rec.train.loop import evaluate_checkpoint, shutdown_distributed

    metrics = evaluate_checkpoint(Path(args.checkpoint), args.overrides, progress=not args.quiet)
    shutdown_distributed()
    if metrics["rank"] == 0:
        print(format_metrics(metrics))


def cmd_plan(args: argparse.Namespace) -> None:
    from muse_rec.distributed.planning import hardware_profile_path, memory_table, placement_table, plan_offline, save_plan

    config = _config_on_hardware(args)
    vocab = args.vocab or config.data.vocab
    plan, memory = plan_offline(config, config.hardware, vocab)
    print(placement_table(plan))
    print()
    print(memory_table(memory, config.hardware.device_type))
    out = Path(args.out) / f"{hardware_profile_path(args.hardware).stem}-{vocab}.json"
    save_plan(out, plan, config.hardware, memory[0].host_mapped)
    print(f"\nplan for {config.hardware.world_size} x {config.hardware.device_type} written to {out} (use it: train --plan {out})")


def format_metrics(metrics: dict) -> str:
    return (
        f"test: AUC {metrics['auc']:.4f}  GAUC {metrics['gauc']:.4f} ({metrics['gauc_users']:,} users)  "
        f"reference per-batch GAUC {metrics['reference_batch_gauc']:.4f}  logloss {metrics['logloss']:.4f}  "
        f"rows {metrics['rows']:,}"
    )


def cmd_quickstart(args: argparse.Namespace) -> int:
    """The main job on the embedded defaults: synthesize a small data set, train MUSE on 2 CPU
    ranks (torchrun), evaluate and print AUC and GAUC."""
    from muse_rec.data.synth import synthesize

    config = _config(args)
    synthesize(
        config.synth, Path(config.data.root), progress=not args.quiet, force=args.force,
        elsewhere="set data.root=DIR to a directory for the synthetic set",
    )
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
        "-m", "muse_rec.cli", "train", *(["--quiet"] if args.quiet else []),
        *(["--config", args.config] if args.config else []), *args.overrides,
    ]
    log.info("launching: %s", " ".join(command))
    return subprocess.run(command, check=False).returncode


def _positive_int(text: str) -> int:
    """argparse type: a count of at least 1 (0 or less would fail later, deep inside a command)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, found {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, found {value}")
    return value


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (see configs/); defaults are built in")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.batch_size=500")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="muse-rec",
        description="muse_rec: MUSE-style lifelong multimodal recommenders on TorchRec. Every config key: `muse-rec config`.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True)

    def sub_parser(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, parents=[common])

    p = sub_parser("quickstart", "synthesize a small data set, train MUSE on 2 CPU ranks, print AUC and GAUC")
    _add_config_args(p)
    p.add_argument("--nproc", type=_positive_int, default=2, help="ranks to train on (default 2)")
    p.add_argument(
        "--force", action="store_true",
        help="let the synthetic set replace a data set in data.root that `muse-rec synth` did not write (a downloaded or "
        "prepared one: its train/, test/, feature_map/, raw/ are deleted once the new set is complete); without it such a "
        "data.root is refused",
    )
    p.set_defaults(run=cmd_quickstart)

    p = sub_parser("train", "train one epoch and evaluate (run it under torchrun or torchx for several ranks)")
    _add_config_args(p)
    p.add_argument("--hardware", help="hardware profile (configs/hardware/NAME.yaml or a path) to plan for at start-up")
    p.add_argument("--plan", help="sharding plan file from `muse-rec plan` (sets sharding.plan): no planning at start-up")
    p.set_defaults(run=cmd_train)

    p = sub_parser("plan", "plan the table sharding for a hardware profile offline (no data, GPU or ranks needed)")
    _add_config_args(p)
    p.add_argument("--hardware", required=True, help="hardware profile: a name in configs/hardware/ (e.g. h100x8) or a YAML path")
    p.add_argument("--vocab", choices=("p90", "full"), help="item vocabulary to size the tables for (default: data.vocab)")
    p.add_argument("--out", default="plans", help="directory of the plan file <hardware>-<vocab>.json (default: plans/)")
    p.set_defaults(run=cmd_plan)

    p = sub_parser("eval", "evaluate a checkpoint on the test split (any number of ranks)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (<run>/checkpoints/step-NNNNNNNN)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.root=...")
    p.set_defaults(run=cmd_eval)

    p = sub_parser("config", "print the resolved config with every key's documentation")
    _add_config_args(p)
    p.set_defaults(run=cmd_config)

    p = sub_parser("synth", "write a synthetic data set in the released TAOBAO-MM layout")
    _add_config_args(p)
    p.add_argument("--out", help="output directory (default: data.root)")
    p.add_argument(
        "--force", action="store_true",
        help="replace a data set in the output directory that `muse-rec synth` did not write (a downloaded or prepared one: "
        "its train/, test/, feature_map/, raw/ are deleted once the new set is complete); without it such a directory is refused",
    )
    p.set_defaults(run=cmd_synth)

    p = sub_parser("stream", "read splits through the loader and summarise them")
    _add_config_args(p)
    p.add_argument("--splits", default="train,test", help="comma-separated splits (default: train,test)")
    p.set_defaults(run=cmd_stream)

    p = sub_parser("prepare", "rebuild maps, SCL arrays and joined shards from raw tables")
    p.add_argument("--raw", required=True, help="directory with the six raw TAOBAO-MM parquet tables")
    p.add_argument("--out", required=True, help="output data directory (released layout)")
    p.add_argument("--coverage", type=float, default=0.9, help="history-interaction coverage of the p90 item map")
    p.add_argument("--strict", action="store_true", help="refuse duplicated or 0 SCL keys instead of keeping the first / dropping them")
    p.add_argument("--rows-per-shard", type=_positive_int, default=500_000, help="rows per shard file")
    p.add_argument("--row-group-rows", type=_positive_int, default=10_000, help="rows per parquet row group")
    p.add_argument(
        "--force", action="store_true",
        help="replace a data set in --out that `muse-rec prepare` did not write (a downloaded or synthetic one: its train/, "
        "test/, feature_map/ are deleted once the new set is complete; raw/ is kept); without it such a directory is refused",
    )
    p.set_defaults(run=cmd_prepare)

    p = sub_parser("download", "fetch TAOBAO-MM (or a selection of it) from the Hugging Face hub")
    p.add_argument("--dest", required=True, help="local directory (downloads resume there)")
    p.add_argument("--vocab", choices=("p90", "full"), default="p90", help="which item vocabulary's maps to fetch")
    p.add_argument(
        "--splits", default="train,test",
        help="comma-separated splits to fetch; empty (--splits '') fetches no split, only the maps, SCL table and --raw tables",
    )
    p.add_argument("--max-shards", type=_positive_int, help="fetch only the first N shards of each split")
    p.add_argument("--raw", action="store_true", help="also fetch the raw (unjoined) tables")
    p.add_argument(
        "--force", action="store_true",
        help="fetch into a --dest holding a data set that `muse-rec download` did not write (a synthetic or prepared one: its "
        "train/, test/, feature_map/, raw/ are deleted first); without it such a directory is refused. An earlier download "
        "there needs no --force: it is resumed",
    )
    p.set_defaults(run=cmd_download)

    p = sub_parser("verify", "check a local data directory and report what is missing or wrong")
    p.add_argument("root", help="data directory")
    p.add_argument("--strict", action="store_true", help="unsorted, duplicated or 0 SCL keys are errors, not warnings")
    p.add_argument("--deep", action="store_true", help="also scan every row group (labels, sequence alignment)")
    p.set_defaults(run=cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)  # our own progress lines; TorchRec's INFO chatter stays off
    try:
        return args.run(args) or 0
    except MuseRecError as e:
        print(f"muse-rec {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the user gave that the system refuses: the message names it
        print(f"muse-rec {args.command}: error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
