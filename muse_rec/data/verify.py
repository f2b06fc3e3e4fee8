"""`muse-rec verify`: check a local copy of TAOBAO-MM and report every problem, not just the first.

A copy of 139 GB is fetched over hours, often by hand or in parts; one run of `verify` lists all
that is missing or broken, each finding naming the file and what was expected. The checks are the
readers' own (`checks`, `feature_map`), run one at a time so that one failure does not hide the
next. Footers, metadata and feature maps are always checked; `deep` also reads every row group.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from muse_rec.data import schema
from muse_rec.data.checks import check_aligned, check_columns, clicks_from_labels, open_parquet
from muse_rec.data.content import content_fields
from muse_rec.data.feature_map import SclIndex, load_id_map
from muse_rec.data.layout import SPLITS, DatasetLayout
from muse_rec.errors import DataError

log = logging.getLogger(__name__)

ERROR = "error"
WARNING = "warning"


@dataclass
class Finding:
    level: str  # ERROR: the copy cannot be used as it is; WARNING: usable, but worth knowing
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.level}: {self.path}: {self.message}"


def _finding(level: str, path: Path, message: str) -> Finding:
    """A finding; a message that already starts with the path (a DataError's) loses that prefix."""
    return Finding(level, str(path), message.removeprefix(f"{path}: "))


def verify(root: str | Path, strict: bool = False, deep: bool = False, progress: bool = True) -> list[Finding]:
    """All findings about the data directory `root`; no errors means training can read it.

    `strict` makes repairable problems (unsorted, duplicated or 0 SCL keys) errors; `deep` also scans
    every row group of every shard (labels one-hot, sequences aligned).
    """
    layout = DatasetLayout(root)
    if not layout.root.is_dir():
        return [_finding(ERROR, layout.root, "not a directory (expected a TAOBAO-MM data directory)")]
    findings = _verify_layout(layout)
    for split in SPLITS:
        if layout.split_dir(split).is_dir():
            findings += _verify_split(layout, split, deep, progress)
    findings += _verify_feature_maps(layout)
    findings += _verify_scl(layout, strict)
    findings += _verify_item_content(layout)
    errors = sum(f.level == ERROR for f in findings)
    log.info("verified %s: %d error(s), %d warning(s)", layout.root, errors, len(findings) - errors)
    return findings


def _verify_layout(layout: DatasetLayout) -> list[Finding]:
    """Both splits missing is an error; one is a warning (a user may fetch only one)."""
    missing = [split for split in SPLITS if not layout.split_dir(split).is_dir()]
    if len(missing) == len(SPLITS):
        return [_finding(ERROR, layout.root, f"no split directory: expected {' and/or '.join(s + '/' for s in SPLITS)}")]
    return [
        _finding(WARNING, layout.split_dir(split), f"split directory missing: the {split} split cannot be used")
        for split in missing
    ]


def _verify_split(layout: DatasetLayout, split: str, deep: bool, progress: bool) -> list[Finding]:
    """Shards readable with the joined schema, and metadata.json agreeing with their footers."""
    paths = layout.shards(split)
    if not paths:
        return [_finding(ERROR, layout.split_dir(split), f"no shard files (expected {split}-shard-NNNNNN.parquet)")]
    findings: list[Finding] = []
    footer_rows: dict[str, int] = {}
    scannable: dict[Path, pq.ParquetFile] = {}
    for path in tqdm(paths, desc=f"verify {split}", unit="shard", disable=not progress):
        try:
            parquet = open_parquet(path)
        except DataError as e:
            findings.append(_finding(ERROR, path, str(e)))
            continue
        footer_rows[path.name] = parquet.metadata.num_rows
        column_findings = _verify_columns(path, parquet.schema_arrow)
        findings += column_findings
        if not column_findings:
            scannable[path] = parquet
    findings += _verify_metadata(layout, split, footer_rows if len(footer_rows) == len(paths) else None)
    if deep:
        findings += _scan_row_groups(scannable, split, progress)
    return findings


def _verify_columns(path: Path, found: pa.Schema) -> list[Finding]:
    """Every missing or mistyped column, each in the readers' wording (check_columns per field)."""
    findings = []
    for field in schema.JOINED_SCHEMA:
        try:
            check_columns(path, found, pa.schema([field]))
        except DataError as e:
            findings.append(_finding(ERROR, path, str(e)))
    return findings


def _verify_metadata(layout: DatasetLayout, split: str, footer_rows: dict[str, int] | None) -> list[Finding]:
    """total_rows equals the footers' sum, num_shards the file count; listed shards exist.

    `footer_rows` (rows by shard file name) is None when some shard is unreadable: sums are then
    meaningless and skipped. num_shards one off from the file count is only a warning: downloaders
    report exactly that for the released set. Shards listed by name ({"file", "rows"}, as our
    writers do) must exist and hold the rows listed.
    """
    meta_path = layout.metadata_path(split)
    try:
        meta = layout.read_metadata(split)
    except DataError as e:
        return [_finding(ERROR, meta_path, str(e))]
    findings = []
    if footer_rows is not None and meta["total_rows"] != sum(footer_rows.values()):
        findings.append(_finding(
            ERROR, meta_path,
            f"total_rows is {meta['total_rows']} but the {len(footer_rows)} shard footers hold {sum(footer_rows.values())} rows",
        ))
    findings += _verify_num_shards(meta_path, meta.get("num_shards"), len(layout.shards(split)))
    for listed in meta.get("shards") or []:
        if not isinstance(listed, dict) or "file" not in listed:
            continue  # the hub's metadata may describe shards differently
        shard = layout.split_dir(split) / listed["file"]
        rows = None if footer_rows is None else footer_rows.get(shard.name)
        if not shard.exists():
            findings.append(_finding(ERROR, shard, f"missing (listed in {meta_path.name})"))
        elif rows is not None and listed.get("rows", rows) != rows:
            findings.append(_finding(ERROR, shard, f"holds {rows} rows, {meta_path.name} says {listed['rows']}"))
    return findings


def _verify_num_shards(meta_path: Path, num_shards: object, files: int) -> list[Finding]:
    if num_shards is None:
        return []
    if not isinstance(num_shards, int):
        return [_finding(ERROR, meta_path, f"num_shards must be an integer, found {num_shards!r}")]
    if num_shards == files:
        return []
    message = f"num_shards is {num_shards} but {files} shard file(s) are present"
    if abs(num_shards - files) == 1:
        return [_finding(WARNING, meta_path, message + " (one off, as downloaders report for the released set)")]
    return [_finding(ERROR, meta_path, message)]


def _scan_row_groups(shards: dict[Path, pq.ParquetFile], split: str, progress: bool) -> list[Finding]:
    """Every row group: labels one-hot and behaviour sequences aligned; one finding per bad group."""
    columns = [schema.LABEL, schema.HIST_ITEMS, schema.HIST_CATES]
    total = sum(pf.num_row_groups for pf in shards.values())
    findings = []
    with tqdm(total=total, desc=f"scan {split}", unit="row group", disable=not progress) as bar:
        for path, pf in shards.items():
            for group in range(pf.num_row_groups):
                where = f"{path}, row group {group}"
                try:
                    table = pf.read_row_group(group, columns=columns)
                    clicks_from_labels(table.column(schema.LABEL).combine_chunks(), where)
                    check_aligned(
                        table.column(schema.HIST_ITEMS).combine_chunks(), table.column(schema.HIST_CATES).combine_chunks(), where
                    )
                except DataError as e:
                    findings.append(_finding(ERROR, path, str(e)))
                except (pa.ArrowException, OSError) as e:
                    findings.append(_finding(ERROR, path, f"row group {group} is not readable (corrupt?): {e}"))
                bar.update()
    return findings


def _verify_feature_maps(layout: DatasetLayout) -> list[Finding]:
    """Every map present and valid, with at least one usable item vocabulary (p90 and/or full)."""
    if not layout.feature_map_dir.is_dir():
        return [_finding(ERROR, layout.feature_map_dir, "directory missing (feature maps and the SCL table live here)")]
    findings = []
    for field in schema.FEATURE_MAPS:
        if field != schema.ITEM_MAP:
            findings += _verify_map(layout.map_path(field), field)
    usable = []
    for vocab in schema.VOCABS:
        path = layout.map_path(schema.ITEM_MAP, vocab)
        if path.exists():
            map_findings = _verify_map(path, schema.ITEM_MAP)
            findings += map_findings
            if not map_findings:
                usable.append(vocab)
    item_maps = " and ".join(layout.map_path(schema.ITEM_MAP, vocab).name for vocab in schema.VOCABS)
    if not usable:
        findings.append(_finding(ERROR, layout.feature_map_dir, f"no usable item vocabulary: expected {item_maps} (one or both)"))
    elif len(usable) < len(schema.VOCABS):
        findings.append(_finding(
            WARNING, layout.feature_map_dir,
            f"only the {usable[0]} item vocabulary is usable: runs need data.vocab={usable[0]}",
        ))
    log.info("usable item vocabularies: %s", ", ".join(usable) or "none")
    return findings


def _verify_map(path: Path, field: str) -> list[Finding]:
    try:
        load_id_map(path, field)
    except DataError as e:
        return [_finding(ERROR, path, str(e))]
    return []


def _verify_scl(layout: DatasetLayout, strict: bool) -> list[Finding]:
    """The SCL table as training loads it. Missing or mis-shaped files are errors; unsorted,
    duplicated or 0 keys are repaired at load, so they are warnings (errors when `strict`, as loading
    then refuses them). SclIndex tells the two apart: only the key problem depends on `strict`."""
    if not layout.feature_map_dir.is_dir():
        return []  # already reported with the feature maps
    missing = [path for path in (layout.scl_keys_path, layout.scl_values_path) if not path.exists()]
    if missing:
        return [_finding(ERROR, path, "missing (the SCL table needs both keys and values)") for path in missing]
    try:
        SclIndex(layout.scl_keys_path, layout.scl_values_path, strict=True)
        return []
    except DataError as e:
        order_problem = str(e)
    try:
        SclIndex(layout.scl_keys_path, layout.scl_values_path, strict=False)
    except DataError as e:
        return [_scl_finding(layout, ERROR, str(e))]
    if strict:
        return [_scl_finding(layout, ERROR, order_problem)]
    return [_scl_finding(
        layout, WARNING,
        order_problem.removesuffix("; refused because strict checking is on")
        + "; repaired at load (sorted once, the first of duplicated keys wins, keys 0 are dropped); "
        "strict checking makes this an error",
    )]


def _verify_item_content(layout: DatasetLayout) -> list[Finding]:
    """The optional item content table (method lemur): its schema, and unique item IDs."""
    path = layout.item_content_path
    if not path.exists():
        return []
    try:
        content_fields(pq.read_schema(path), path)
        ids = pq.read_table(path, columns=[schema.TARGET_ITEM]).column(0).to_numpy()
    except (DataError, pa.ArrowInvalid, OSError) as e:
        return [_finding(ERROR, path, str(e))]
    if len(np.unique(ids)) != len(ids):
        return [_finding(ERROR, path, f"column {schema.TARGET_ITEM} has duplicated item IDs")]
    return []


def _scl_finding(layout: DatasetLayout, level: str, message: str) -> Finding:
    """A finding on whichever SCL file the message names (keys or values)."""
    paths = (layout.scl_keys_path, layout.scl_values_path)
    return _finding(level, next((p for p in paths if message.startswith(f"{p}: ")), paths[0]), message)
