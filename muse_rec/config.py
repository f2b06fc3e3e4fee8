"""The config tree: typed dataclasses, loaded from YAML with `a.b=c` command-line overrides.

This file is the one place every key is documented: each field carries its meaning in `doc`, and
`muse-rec config` prints the resolved tree with those docs. An unknown key, a wrong type or a
value outside a field's choices is a `ConfigError` that names the key.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from muse_rec.schema import SCL_DIM
from muse_rec.errors import ConfigError


def option(default: Any, doc: str, at_least: float | None = None, at_most: float | None = None) -> Any:
    """A config field with its documentation and, for numbers, the range the code relies on
    (checked when the config is loaded, so a bad value fails before any table is read)."""
    metadata = {"doc": doc, "at_least": at_least, "at_most": at_most}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls: type, doc: str) -> Any:
    return field(default_factory=cls, metadata={"doc": doc})


@dataclass
class DataConfig:
    root: str = option("data/synthetic", "Data directory in the released TAOBAO-MM layout (train/, test/, feature_map/).")
    vocab: Literal["p90", "full"] = option(
        "p90", "Item vocabulary: 'p90' (items covering 90% of history interactions plus all targets) or 'full'."
    )
    long_seq_len: int = option(1000, "Lifelong sequence length: the last N behaviours, left-padded with 0.", at_least=1)
    batch_size: int = option(1000, "Samples per batch on each rank.", at_least=1)
    num_workers: int = option(1, "DataLoader worker processes per rank (0 reads in the training process).", at_least=0)
    read_ahead: int = option(
        0,
        "With num_workers 0: batches a background thread of the training process reads ahead, beside the step (no "
        "worker processes, so no batch is copied into fresh shared memory to cross a process boundary). 0: none.",
        at_least=0,
    )
    decode_rows: int = option(
        1024,
        "Rows the loader reads and decodes at a time, streamed from each parquet row group: its work per batch stays "
        "even (a whole row group at once stalls every rank at each row group and makes the kernel zero fresh pages "
        "for all of its columns). A batch may span chunks: its rows are the same whatever this value, and a user's "
        "history split between two chunks is carried once for each.",
        at_least=1,
    )
    strict: bool = option(False, "Refuse SCL keys that are unsorted, duplicated or 0 (missing) instead of repairing them with a warning.")


@dataclass
class SynthConfig:
    seed: int = option(42, "Seed: the same seed and sizes give byte-identical files.")
    train_users: int = option(2000, "Users in the train split (each with candidates_min..candidates_max impressions).")
    test_users: int = option(500, "Users in the test split (new users: their user IDs are out of vocabulary).")
    items: int = option(200_000, "Items in the catalogue.")
    categories: int = option(400, "Item categories.")
    clusters_per_category: int = option(4, "Semantic clusters per category: items of one cluster have close SCL vectors.")
    item_zipf: float = option(1.1, "Zipf exponent of item popularity inside a cluster (a long tail makes the p90 cut real).")
    interests_per_user: int = option(3, "Long-term interest clusters per user.")
    interest_zipf: float = option(
        0.0,
        "Weights of a user's interests in the history: the k-th interest (k = 0, 1, ...) has weight (k + 1) ** -z "
        "(0: all equal). Targets still pick an interest uniformly, so the same-cluster count of interest targets is graded.",
        at_least=0,
    )
    cluster_categories: int = option(
        1,
        "Categories one semantic cluster's items spread over. 1: a cluster lies in one category. G > 1: categories "
        "form groups of G consecutive ones and each item of a cluster lies in one of its group's G categories (a fixed "
        "hash of the item), so clusters cut across categories and a category match catches about 1/G of a cluster. "
        "`categories` must be a multiple of G.",
        at_least=1,
    )
    history_len: int = option(1000, "Maximum lifelong behaviours per user.")
    full_history_share: float = option(0.9, "Share of users with a full-length history; the rest get 50..history_len.")
    interest_share: float = option(0.5, "Share of long-history behaviours drawn from the user's interest clusters.")
    short_len: int = option(50, "The most recent behaviours, drawn mostly off-interest (a weakly informative recent session).")
    short_interest_share: float = option(0.03, "Share of the recent behaviours drawn from the interest clusters.")
    recent_len: int = option(
        0,
        "The most recent behaviours (short_len of them included) whose older part, beyond the last short_len, draws from "
        "the interest clusters with recent_interest_share instead of interest_share (0: no such window).",
        at_least=0,
    )
    recent_sibling_share: float = option(
        0.0,
        "Share of the off-interest behaviours among the last recent_len (short_len included) drawn from another cluster "
        "of an interest's category group (category browsing: same categories, other semantics) instead of a random cluster.",
        at_least=0, at_most=1,
    )
    recent_interest_share: float = option(
        0.5, "Share of the behaviours between the last short_len and the last recent_len drawn from the interest clusters.",
        at_least=0, at_most=1,
    )
    candidates_min: int = option(6, "Fewest impressions per user.")
    candidates_max: int = option(16, "Most impressions per user.")
    target_interest_share: float = option(0.3, "Share of targets drawn from one of the user's interest clusters.")
    target_same_category_share: float = option(
        0.2, "Share of targets from another cluster of an interest cluster's category (category match without semantic match)."
    )
    click_bias: float = option(-4.4, "Click logit intercept (sets the click rate, about 14% with the defaults).")
    long_signal_weight: float = option(
        0.8, "Click logit per log1p(count of the user's behaviours in the target's semantic cluster), over all of them."
    )
    short_signal_weight: float = option(0.3, "Extra click logit per log1p(count of those among the recent behaviours).")
    coverage: float = option(0.9, "History-interaction coverage of the p90 item vocabulary (plus all targets).")
    rows_per_shard: int = option(500_000, "Rows per shard file.")
    row_group_rows: int = option(10_000, "Rows per parquet row group.")
    raw: bool = option(False, "Also write the unjoined raw tables under raw/ (the input of `muse-rec prepare`).")
    scl_mislabel_share: float = option(
        0.0,
        "Share of SCL vectors drawn around a sibling cluster (same category) instead of the item's own: the image "
        "misleads, the title does not. Clicks follow the true cluster, so content tokens carry what these vectors lack.",
    )
    content_vocab: int = option(
        8192, "Token vocabulary of the item titles in feature_map/item_content.parquet: 0 padding, 1 field separator, "
        "then one keyword per cluster and per category, the rest filler words."
    )
    title_tokens: int = option(8, "Tokens per item title (a cluster keyword, a category keyword, the rest filler).")


@dataclass
class LemurConfig:
    """End-to-end content encoder with a memory bank (method `lemur`, shared/spec/lemur.md)."""

    content_input: Literal["tokens", "scl"] = option(
        "tokens",
        "What the encoder reads: 'tokens' (title tokens from feature_map/item_content.parquet) or 'scl' (the item's "
        "frozen SCL vector cut into `scl_chunks` tokens: TAOBAO-MM ships no raw text).",
    )
    vocab_size: int = option(8192, "Token vocabulary of the content table (token IDs must be below it; 0 pads, 1 separates fields).", at_least=2)
    max_tokens: int = option(16, "Title tokens read per item (longer titles are cut, shorter ones padded).", at_least=1)
    scl_chunks: int = option(8, "content_input=scl: the 128-d SCL vector becomes this many tokens of 128/scl_chunks values.", at_least=1)
    layers: int = option(2, "Transformer layers of the content encoder.", at_least=1)
    centre_output: bool = option(
        True,
        "Subtract the mean representation from the encoder's output (the batch's in training, a running mean in "
        "evaluation), so no loss can collapse every item onto one direction (without it, training did: "
        "benchmarks/lemur.py).",
    )
    width: int = option(64, "Model width of the content encoder.", at_least=1)
    heads: int = option(4, "Attention heads of the content encoder.", at_least=1)
    encode_share: float = option(
        1.0, "p: share of samples whose target runs the encoder forward (the others read their target from the bank).",
        at_least=0, at_most=1,
    )
    backward_share: float = option(
        1.0, "q (<= p): share of samples whose target encoding also gets gradient; the rest of the p share run it without.",
        at_least=0, at_most=1,
    )
    contrastive_weight: float = option(
        0.1, "Weight of the in-batch InfoNCE between user and clicked item (other rows of the same user masked out).",
        at_least=0,
    )
    contrastive_scale: float = option(50.0, "Scale of the cosine logits of the contrastive loss (the paper's 50).", at_least=0)
    cooccurrence_weight: float = option(
        0.0,
        "Weight of the co-occurrence InfoNCE between history items (0: off). The loader pairs items of one history: "
        "`cooccurrence_pairs` positions of each distinct history, each with the other item of that history whose "
        "frozen SCL vector is closest (cosine >= cooccurrence_min_cosine); the encoder encodes both with gradient and "
        "learns to put them together, the other pairs of the batch as negatives (pairs of the same history masked "
        "out). Users' histories are where the data says which items belong together, and the bank's reads of them "
        "carry no gradient: without this the encoder learns from clicked targets alone (benchmarks/lemur.py).",
        at_least=0,
    )
    cooccurrence_pairs: int = option(32, "Positions of each distinct history the loader draws as anchors of co-occurrence pairs.", at_least=1)
    cooccurrence_min_cosine: float = option(
        0.5,
        "An anchor is paired only if the history holds another item whose SCL cosine with it reaches this (items of "
        "one semantic cluster: about 0.73 on the synthetic set; of sibling clusters 0.26); items without an SCL "
        "vector are never drawn.",
        at_least=-1, at_most=1,
    )
    cooccurrence_negatives: int = option(
        0,
        "Hard negatives per co-occurrence pair (0: the batch's other pairs alone). The loader draws positions of the "
        "batch's other histories whose item lies in the anchor's category with an SCL cosine below "
        "cooccurrence_negative_max_cosine: mostly sibling clusters, which the other pairs, seldom of the anchor's "
        "category, almost never offer. Their representations are the bank's (read anyway for the histories: no encoding).",
        at_least=0,
    )
    cooccurrence_negative_max_cosine: float = option(
        0.45, "A hard negative's SCL cosine with its anchor is below this (cluster-mates are about 0.73 apart).", at_least=-1, at_most=1,
    )
    ranking_weight: float = option(1.0, "Weight of the click loss (0 with contrastive only: the two-stage pretraining).", at_least=0)
    train_encoder: bool = option(
        True,
        "Train the encoder (false: frozen, e.g. the second stage of the two-stage variant; a frozen encoder always runs "
        "as in evaluation, so an item's value never changes).",
    )
    ranker_gradient: bool = option(
        True,
        "Let the ranking loss train the encoder through the target's representation (false: the ranker reads it "
        "detached and only the contrastive loss trains the encoder: the paper's stop-gradient ablation).",
    )
    tower_reads_target: bool = option(
        True,
        "The tower reads the target's (L2-normalised) representation as a feature, as the paper's ranker reads the "
        "encoded target (false: the representation reaches the ranker only through its similarities to the history).",
    )
    keep_scl: bool = option(
        False,
        "MUSE's GSU and ESU keep the frozen SCL vectors (the loader's cosines of the target with all L positions, as "
        "sim_soft's) and the representations join the tower beside them: the encoded target, the missing flags, a "
        "SimTier histogram of the target's cosines to the whole long history (and sorted_similarities), as the paper "
        "adds LEMUR's features to its base ranker. false: the representations take the SCL vectors' place in the GSU, "
        "SimTier and SA-TA.",
    )
    sorted_similarities: int = option(
        0,
        "n > 0: the tower also reads the n largest cosines between the target's representation and the long history "
        "(the paper's cosine-similarity feature in sorted form), a path by which the ranking loss trains the encoder "
        "(the GSU's top-K and SimTier's histogram pass no gradient). 0: off.",
        at_least=0,
    )
    history_attention: bool = option(
        False,
        "The tower also reads an attention from the target's representation over its whole long history's "
        "representations (the bank's), pooled and projected to 2 x embedding_dim: the paper's sequence module over "
        "the history, and the ranking loss's main path into the encoder (through the target's query).",
    )
    soft_simtier: bool = option(
        False,
        "Share each cosine between SimTier's two nearest bins instead of counting it in one: the histogram becomes "
        "differentiable in the cosine, another path by which the ranking loss trains the encoder (the hard one passes "
        "no gradient). With keep_scl, the histogram of the representations' cosines (SCL's stay hard).",
    )
    warm_start: Literal["none", "train_items", "all_items"] = option(
        "train_items",
        "Fill the bank before the first step (muse_rec.distributed.warm_start): 'train_items' encodes every distinct "
        "item the train split reads (the last data.long_seq_len of each history, and the targets), found by one scan "
        "of the split shared by the ranks; 'all_items' every row of the item table (no scan; with the p90 vocabulary "
        "nearly the same items); 'none' leaves it empty (only targets and the refresh write it). Each rank encodes "
        "the rows it holds, so nothing is exchanged. A resumed run takes the bank from its checkpoint instead.",
    )
    warm_start_chunk: int = option(4096, "Items the warm start encodes at once on each rank (one encoder batch).", at_least=1)
    warm_start_save_every: int = option(
        0,
        "Chunks between saves of the warm start's progress (the bank so far) to <train.out>/warm_start/, so a run "
        "killed during the warm start resumes it without redoing finished chunks; it is always saved once complete, "
        "so a run killed before its first checkpoint does not redo it. 0: only then.",
        at_least=0,
    )
    refresh_rows: int = option(
        0,
        "Bank rows each rank re-encodes each training step without gradient, before the bank is read, to keep it "
        "close to the current encoder (0: none). Bounded work: refresh_rows encoder forwards a rank a step.",
        at_least=0,
    )
    refresh_policy: Literal["most_read", "oldest"] = option(
        "most_read",
        "Which rows the refresh re-encodes: 'most_read', the distinct history rows this rank's batch reads most often "
        "(this step's encoded targets left out), written with the targets through the same all-gather; 'oldest', a "
        "cyclic sweep over the rows this rank holds, so the rows re-encoded are those re-encoded longest ago (every "
        "row once per rows held / refresh_rows steps), written locally. Never-written rows are left missing.",
    )
    reencode_every: int = option(
        0,
        "N > 0: after every N training steps each rank re-encodes, without gradient, every written bank row it holds "
        "(in chunks of warm_start_chunk, locally: no exchange), so the whole bank is the current encoder's and a fast "
        "encoder leaves no stale history behind (muse_rec.distributed.warm_start.reencode_bank; its seconds and the "
        "bank's staleness before it go to metrics.jsonl). 0: never.",
        at_least=0,
    )
    reencode_before_eval: bool = option(
        False,
        "Re-encode the whole bank as reencode_every does once more after the last training step, before the final "
        "checkpoint and the evaluation, so evaluation reads the histories as the final encoder encodes them.",
    )
    encoder_checkpoint: str | None = option(
        None, "Checkpoint directory whose encoder weights initialise this run's encoder (the two-stage variant)."
    )
    bank_dtype: Literal["fp16", "fp32"] = option("fp16", "Storage of the memory bank rows (256 B a row in fp16).")
    history_source: Literal["bank", "encoder"] = option(
        "bank",
        "Where history representations come from: 'bank' (LEMUR) or 'encoder' (encode every distinct history item "
        "each step, with gradient: the cost baseline of benchmarks/lemur.py).",
    )
    eval_target: Literal["encoder", "bank"] = option(
        "encoder", "Evaluation: encode the target items, or score from the bank alone (no encoder run at all)."
    )

    @property
    def trains_on_pairs(self) -> bool:
        """Whether training draws and encodes co-occurrence pairs: a weight > 0 and an encoder to train."""
        return self.cooccurrence_weight > 0 and self.train_encoder


@dataclass
class ModelConfig:
    method: Literal["muse", "sim_soft", "sim_hard", "din", "lemur"] = option(
        "muse",
        "GSU of the long sequence: 'muse' (SCL cosine top-K), 'sim_soft' (ID-embedding cosine top-K), "
        "'sim_hard' (latest K of the target's category), 'din' (no long branch: only the short sequence) or 'lemur' "
        "(cosine top-K of representations from a jointly trained content encoder and its memory bank; `model.lemur`).",
    )
    embedding_dim: int = option(16, "D: width of every ID table; the user attributes 130_3..130_5 use D/2.", at_least=2)
    keep_top: int = option(50, "K: positions of the long sequence the GSU keeps.", at_least=1)
    short_seq_len: int = option(50, "Short sequence: the last N positions of the padded long sequence.", at_least=1)
    init_std: float = option(
        0.001,
        "Std of the normal init of ID-table rows, truncated to [-2, 2] as the reference's trunc_normal_ (absolute "
        "bounds: at 0.001 a plain normal).",
        at_least=0,
    )
    scl_storage: Literal["fp16_sharded", "int8_replicated"] = option(
        "fp16_sharded",
        "The frozen SCL table: 'fp16_sharded' (a TorchRec table sharded by the plan, 256 B a row split over ranks, "
        "lookups through all-to-all) or 'int8_replicated' (the int8 values file itself on every rank, 128 B a row, "
        "memory-mapped and shared by the ranks of a CPU host, no communication).",
    )
    gsu_stage: Literal["loader", "model"] | None = option(
        None,
        "Where the GSU's frozen inputs are computed. 'loader': in the data pipeline, once per distinct history of a "
        "batch, from the memory-mapped int8 SCL values file (one copy in the page cache per host, no SCL table in the "
        "model): muse's SCL-cosine top-K and sim_hard's category matches are selected there, so the batch carries "
        "only the target, the K kept positions and the last short_seq_len positions with their SCL cosines, and "
        "the model looks up nothing else; din reads nothing of the long sequence; sim_soft (scores from trainable "
        "embeddings) keeps its top-K in the model (scored on a lookup without gradient; the kept and last positions "
        "are looked up again with gradient) but takes the SCL cosines of all positions from the loader. "
        "'model': whole sequences in the batch and the SCL table in the model (`scl_storage`), the GSU on the "
        "accelerator. null: 'loader', except for lemur, whose bank representations change while training "
        "('model' only).",
    )
    masked: bool = option(
        False,
        "Corrected variant (off = reference semantics): padded positions are masked out of attention, mean pools "
        "and SimTier counts instead of entering them with zero vectors.",
    )
    lemur: LemurConfig = section(LemurConfig, "Content encoder and memory bank of method 'lemur' (ignored by the others).")

    @property
    def stage(self) -> Literal["loader", "model"]:
        """`gsu_stage` resolved: null is 'loader' for every method but lemur."""
        return self.gsu_stage or ("model" if self.method == "lemur" else "loader")


@dataclass
class OptimConfig:
    dense_lr: float = option(2e-4, "AdamW learning rate of the dense parameters (reference: 2e-4).", at_least=0)
    dense_weight_decay: float = option(0.01, "AdamW weight decay of the dense parameters (reference: 0.01).", at_least=0)
    encoder_lr: float | None = option(
        None, "AdamW learning rate of lemur's content encoder (null: dense_lr). The rest of the dense part keeps dense_lr."
    )
    encoder_embedding_lr: float | None = option(
        None,
        "AdamW learning rate of the content encoder's token embeddings (null: that of the rest of the encoder). Each "
        "step moves only the tokens of its items, like a sparse table's rows.",
    )
    sparse_lr: float = option(2e-3, "Learning rate of the fused Adam on the embedding tables on CUDA (reference: lazy Adam 2e-3).", at_least=0)
    sparse_cpu: Literal["rowwise_adagrad", "sgd"] = option(
        "rowwise_adagrad",
        "Fused embedding optimizer on CPU, where fbgemm has no Adam: a documented fallback, not the reference's.",
    )
    sparse_cpu_lr: float = option(0.01, "Learning rate of the CPU fallback embedding optimizer.", at_least=0)


@dataclass
class TrainConfig:
    seed: int = option(42, "Seed of the dense and embedding initialisation.")
    out: str = option("runs/muse", "Run directory: checkpoints, metrics.jsonl, the resolved config.")
    log_every: int = option(50, "Steps between metric lines in metrics.jsonl.", at_least=1)
    eval_batch_size: int = option(1000, "Samples per evaluation batch on each rank.", at_least=1)
    save_eval_scores: bool = option(
        False,
        "Evaluation: rank 0 writes every evaluated row (user ID, score, label; 13 bytes a row) to eval_scores.npz in "
        "train.out (or beside the checkpoint for `muse-rec eval`), so two runs on the same test split can be compared "
        "paired (muse_rec.train.metrics.paired_gauc_difference; benchmarks/lemur.py) or analysed offline.",
    )
    eval_gauc_se_draws: int = option(
        0,
        "Evaluation: resamples of the test users behind gauc_bootstrap_se, the bootstrap standard error of the GAUC "
        "(0: not computed, the key left out). Costs draws x users gathers on every rank: 1000 draws take a fraction of a second over "
        "thousands of users, about a minute over a million; benchmarks/quality.py asks for 1000.",
        at_least=0,
    )
    checkpoint_every: int = option(0, "Steps between checkpoints (0: only at the end). A checkpoint is always written at the end.", at_least=0)
    keep_checkpoints: int = option(2, "Checkpoints kept in <out>/checkpoints (the newest ones).", at_least=1)
    resume: bool = option(
        True,
        "Resume from the newest checkpoint in <out> if there is one. It must be this run's (model.method, data.root, "
        "data.vocab, table sizes) with the same world size, data.batch_size and data.num_workers, else the run stops "
        "with the key that differs: false starts fresh, and the earlier run's metrics.jsonl, config.yaml and "
        "checkpoints/ move to <out>/prev-run-<date>-<time>/ (nothing is overwritten or deleted).",
    )


ShardingTypeName = Literal["table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise"]
KernelName = Literal["fused", "fused_uvm", "fused_uvm_caching"]


@dataclass
class TableShardingConfig:
    sharding_types: list[ShardingTypeName] = option(
        ["table_wise", "row_wise"],
        "Sharding types the planner may choose for this table (TorchRec's names). data_parallel is never offered: a "
        "data-parallel table loses its fused optimizer. Types the device's sharder lacks are skipped (row_wise for the "
        "pooled tables on CPU, table_row_wise for the sequence tables); a list of only such types is an error.",
    )
    compute_kernels: list[KernelName] | None = option(
        None,
        "Embedding kernels the planner may choose: 'fused' (the table in device memory; in DDR on CPU), 'fused_uvm' "
        "(the table in host memory, read over PCIe), 'fused_uvm_caching' (host memory plus a device-memory cache of "
        "hot rows; CUDA only). null: any kernel the sharder offers on the device.",
    )
    cache_load_factor: float | None = option(
        None, "Share of the table's rows 'fused_uvm_caching' keeps in device memory (null: TorchRec's default, 0.2).",
        at_least=0, at_most=1,
    )


@dataclass
class ShardedTablesConfig:
    item: TableShardingConfig = section(
        TableShardingConfig, "The item table (205 and the sequence 150_2_180): 243 M rows with the full vocabulary, 35 M with p90."
    )
    category: TableShardingConfig = section(TableShardingConfig, "The category table (206 and the sequence 151_2_180): 26 k rows.")
    scl: TableShardingConfig = section(
        TableShardingConfig, "The frozen fp16 SCL table (model.scl_storage=fp16_sharded; the int8 replicated one is not planned)."
    )
    user: TableShardingConfig = section(TableShardingConfig, "The user table 129_1: 6.9 M rows.")
    attributes: TableShardingConfig = section(TableShardingConfig, "The small attribute tables 130_1..130_5, 213 and 214.")
    bank: TableShardingConfig = section(
        TableShardingConfig,
        "The memory bank of method 'lemur' (one 128-d row per item row). Rows are written in place: kernel 'fused' or "
        "'fused_uvm' only (a 'fused_uvm_caching' cache would serve stale rows).",
    )


@dataclass
class ShardingConfig:
    plan: str | None = option(
        None,
        "Plan file written by `muse-rec plan` (plans/<hardware>-<vocab>.json) to shard with; it must name this job's "
        "device type and world size. null: plan collectively at start-up from `hardware` and `sharding.tables`.",
    )
    tables: ShardedTablesConfig = section(ShardedTablesConfig, "What the planner may choose, per table (`train` and `plan` both).")


@dataclass
class HardwareConfig:
    """Sizes in GiB (2**30 bytes) per rank; bandwidths in GB/s (10**9 bytes a second), as datasheets give them."""

    device_type: Literal["cpu", "cuda"] | None = option(
        None, "Device every rank trains on. null: the running job's (a job on other hardware than its profile is refused)."
    )
    world_size: int | None = option(None, "Ranks in all. null: the running job's.", at_least=1)
    local_world_size: int | None = option(
        None, "Ranks per host (GPUs per node, processes per CPU host). null: torchrun's LOCAL_WORLD_SIZE on CUDA, else every rank on one host.",
        at_least=1,
    )
    hbm_cap_gib: float | None = option(
        None,
        "Device memory of one rank, GiB; the planner leaves 15% of it free, besides the dense model and the batches "
        "in flight. null: a running CUDA job's GPU memory (offline planning needs a value; none on CPU).",
        at_least=0,
    )
    ddr_cap_gib: float | None = option(
        None,
        "Host memory of one rank, GiB: the host's RAM minus headroom (OS, data loaders, page cache) divided by "
        "local_world_size. Holds UVM tables on CUDA and every table on CPU. null: TorchRec's default (128 GiB).",
        at_least=0,
    )
    intra_host_bw_gb_s: float | None = option(
        None, "Rank-to-rank bandwidth inside a host (NVLink, PCIe, shared memory), GB/s. null: TorchRec's default.",
        at_least=0,
    )
    inter_host_bw_gb_s: float | None = option(None, "Network bandwidth of one rank to other hosts, GB/s. null: TorchRec's default.", at_least=0)
    hbm_bw_gb_s: float | None = option(None, "Device memory bandwidth, GB/s. null: TorchRec's default.", at_least=0)
    ddr_bw_gb_s: float | None = option(None, "Host memory bandwidth of one rank, GB/s. null: TorchRec's default.", at_least=0)
    host_to_device_bw_gb_s: float | None = option(
        None, "Host-to-device bandwidth of one rank (PCIe), GB/s: what UVM kernels read at. null: TorchRec's default.",
        at_least=0,
    )


@dataclass
class Config:
    data: DataConfig = section(DataConfig, "Where the data lives and how it is batched.")
    synth: SynthConfig = section(SynthConfig, "The synthetic data set written by `muse-rec synth`.")
    model: ModelConfig = section(ModelConfig, "The MUSE-family model.")
    optim: OptimConfig = section(OptimConfig, "Optimizers: fused sparse (in backward) and dense AdamW.")
    train: TrainConfig = section(TrainConfig, "The training run.")
    sharding: ShardingConfig = section(ShardingConfig, "How the embedding tables are sharded over the ranks: a saved plan or the planner's choices.")
    hardware: HardwareConfig = section(
        HardwareConfig, "The hardware the tables are planned for: a profile from configs/hardware/ (`--hardware`), or the running job's."
    )


# -- loading ---------------------------------------------------------------------------------------
def config_from_dict(tree: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A config saved as a dict (e.g. in a checkpoint), then overrides."""
    tree = dataclasses.asdict(_build(Config, tree, ""))
    for item in overrides:
        _apply_override(tree, item)
    return check_relations(_build(Config, tree, ""))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at `path` (if any), then `key.sub=value` overrides, in that order."""
    tree: dict = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level, found {type(loaded).__name__}")
        tree = loaded or {}
    for item in overrides:
        _apply_override(tree, item)
    return check_relations(_build(Config, tree, ""))


def _apply_override(tree: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key.sub=value")
    *parents, leaf = key.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parents[: i + 1])} is a value, not a section")
        node = child
    node[leaf] = OverrideText(text)


class OverrideText(str):
    """A command-line value as typed: YAML-parsed for numbers, booleans, lists and null, but kept as
    written for a text key (`data.root=2024` is the directory '2024', not the number)."""

    def parsed(self) -> Any:
        return yaml.safe_load(self) if self else ""


def _build(cls: type, tree: Any, prefix: str) -> Any:
    if not isinstance(tree, dict):
        raise ConfigError(f"config key {prefix.rstrip('.') or '<root>'}: expected a section (mapping), found {tree!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in tree:
        if key not in fields:
            known = ", ".join(f"{prefix}{k}" for k in fields)
            raise ConfigError(f"unknown config key {prefix}{key} (known keys here: {known})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in tree.items():
        kind = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, value, key + ".")
        else:
            values[name] = _check_range(_check(kind, value, key), fields[name].metadata, key)
    return cls(**values)


def _check_range(value: Any, metadata: Any, key: str) -> Any:
    """A number inside its field's `at_least` / `at_most` (None passes: it means 'not set')."""
    low, high = metadata.get("at_least"), metadata.get("at_most")
    if value is not None and ((low is not None and value < low) or (high is not None and value > high)):
        raise ConfigError(f"config key {key}: expected {_range_text(low, high)}, found {value!r}")
    return value


def _range_text(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f"a value in [{low}, {high}]"
    return f"at least {low}" if low is not None else f"at most {high}"


def check_relations(config: Config) -> Config:
    """Refuse combinations of keys the code would only trip over later (a raw error at the first
    forward, or a silent cut); each error names the keys. Defaults are checked too: they can
    combine badly with a YAML file's values."""
    model, lemur, data = config.model, config.model.lemur, config.data
    rules = (
        (
            not (model.method == "lemur" and model.gsu_stage == "loader"), "model.gsu_stage",
            "'model' or null for method 'lemur' (it scores with bank representations that change while training, so "
            "its GSU runs in the model)",
        ),
        (
            model.method == "din" or model.keep_top <= data.long_seq_len, "model.keep_top",
            f"at most data.long_seq_len = {data.long_seq_len} (the GSU keeps K of the long sequence)",
        ),
        (model.short_seq_len <= data.long_seq_len, "model.short_seq_len", f"at most data.long_seq_len = {data.long_seq_len} (the short sequence is its last N positions)"),
        (model.embedding_dim % 2 == 0, "model.embedding_dim", "an even number (130_3..130_5 use D/2)"),
        (data.read_ahead == 0 or data.num_workers == 0, "data.read_ahead", f"0 with data.num_workers = {data.num_workers} (the thread reads in the training process)"),
        (lemur.backward_share <= lemur.encode_share, "model.lemur.backward_share", f"at most model.lemur.encode_share = {lemur.encode_share} (q <= p)"),
        (lemur.width % lemur.heads == 0, "model.lemur.width", f"a multiple of model.lemur.heads = {lemur.heads}"),
        (
            lemur.sorted_similarities <= data.long_seq_len, "model.lemur.sorted_similarities",
            f"at most data.long_seq_len = {data.long_seq_len} (cosines to the long history)",
        ),
        (
            lemur.content_input != "scl" or SCL_DIM % lemur.scl_chunks == 0,
            "model.lemur.scl_chunks", f"a divisor of the SCL vector's {SCL_DIM} values (model.lemur.content_input=scl)",
        ),
    )
    for ok, key, expected in rules:
        if not ok:
            found = _lookup(config, key)
            raise ConfigError(f"config key {key}: expected {expected}, found {found!r}")
    return config


def _lookup(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = getattr(config, part)
    return config


def _check(kind: Any, value: Any, key: str) -> Any:
    if isinstance(value, OverrideText):
        parsed = value.parsed()
        value = str(value) if parsed is not None and _text_key(kind) else parsed
    origin = typing.get_origin(kind)
    if origin is Literal:
        if value not in typing.get_args(kind):
            choices = ", ".join(repr(c) for c in typing.get_args(kind))
            raise ConfigError(f"config key {key}: expected one of {choices}, found {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(kind)
        if value is None and type(None) in args:
            return None
        (kind,) = [a for a in args if a is not type(None)]
        return _check(kind, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key {key}: expected a list, found {value!r}")
        (item,) = typing.get_args(kind)
        return [_check(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as text
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"config key {key}: expected {kind.__name__}, found {type(value).__name__} {value!r}")
    return value


def _text_key(kind: Any) -> bool:
    """A key typed str (or str | None): any override text is its value."""
    return kind is str or (typing.get_origin(kind) in (typing.Union, types.UnionType) and str in typing.get_args(kind))


# -- documentation ---------------------------------------------------------------------------------
def describe(config: Any, prefix: str = "") -> list[str]:
    """The resolved tree as YAML lines, each key preceded by its documentation."""
    lines = []
    indent = "  " * prefix.count(".")
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        low, high = f.metadata.get("at_least"), f.metadata.get("at_most")
        bounds = f" Expected: {_range_text(low, high)}." if low is not None or high is not None else ""
        lines.append(f"{indent}# {f.metadata.get('doc', '')}{bounds}")
        if dataclasses.is_dataclass(value):
            lines.append(f"{indent}{f.name}:")
            lines.extend(describe(value, f"{prefix}{f.name}."))
        else:
            lines.append(f"{indent}{f.name}: {yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
    return lines


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)
