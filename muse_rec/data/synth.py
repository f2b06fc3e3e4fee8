"""`muse-rec synth`: a synthetic TAOBAO-MM in the released on-disk layout, with a planted signal.

The set is written exactly as the hub ships the real one (train/ and test/ joined shards with
metadata.json, feature_map/ sorted maps, the p90 SCL table, and with `raw` the unjoined tables under
raw/), so every reader, `prepare` and `verify` run on it unchanged. Same config -> byte-identical files.

Generative model (all draws from numpy's PCG64, seeded by (seed, stream, index))
--------------------------------------------------------------------------------------
The defaults give the classic model; configs/synthetic_separating.yaml gives the separating preset
of benchmarks/quality.py. Why the methods tie on one and separate on the other: the last two sections.

Catalogue. `items` items, `categories` categories, each split into `clusters_per_category` semantic
clusters; C = categories * clusters_per_category clusters in all. Item i lies in cluster i mod C
with rank i // C inside it; cluster c has home category c // clusters_per_category. With
`cluster_categories` G = 1 (the default) every item lies in its cluster's home category. With G > 1
clusters cut across categories: the categories form groups of G consecutive ones, and each item lies
in one of its home category's group's G categories (a fixed hash of the item), so a cluster's items
spread evenly over G categories and a category holds items of G * clusters_per_category clusters
(the group's). "The group" of a cluster below is its home category's group (its home category alone
when G = 1). Inside a cluster an item of rank r has popularity (r + 1) ** -item_zipf. Clusters have
popularity (q + 1) ** -CLUSTER_ZIPF, q a seeded random permutation of the clusters (a mild head of
popular clusters). "A random cluster" below is a popularity-weighted draw; "an item of cluster c" a
popularity-weighted draw inside c.

SCL vectors. Each category has a random unit direction; each cluster a unit centroid
normalise(CENTROID_CATEGORY_WEIGHT * g + CENTROID_OWN_WEIGHT * z), g the direction of the first
category of its group, z a random unit vector (centroids of one group have cosine ~0.36). An item's
vector is normalise(centroid + n), n Gaussian with norm ~ITEM_NOISE, stored as int8 =
trunc(clip(v, -1, 1) * 127) (row norms ~122, as released). Cosines between items: ~0.73 in one
cluster, ~0.26 across clusters of one group, ~0 otherwise. As in the release, only the p90 items
have a vector. A `scl_mislabel_share` of items (a fixed hash of the item) get their vector drawn
around a sibling cluster (another cluster of the same home category) instead of their own: the
image misleads.

Item content (feature_map/item_content.parquet, for method lemur). Every item's title is
`title_tokens` token IDs in [2, content_vocab): its cluster's keyword and its category's keyword
at two random positions, the rest filler words drawn uniformly from the tokens no cluster or
category owns (every cluster and category has a keyword of its own, `Catalogue.keyword`). The title
names the true cluster and no other, so it carries what the mislabelled SCL vectors lack, and it
exists for items outside the p90 vocabulary, which have no SCL vector at all.

Users. Each user has `interests_per_user` interest clusters (random clusters, may repeat) and
attributes 130_1..130_5 drawn uniformly from vocabularies of 11, 3, 49, 493, 6 values, each missing
(0) with probability USER_ATTR_MISSING_SHARE: they carry no signal. The history has `history_len`
behaviours for a `full_history_share` of users, else a length uniform in [MIN_HISTORY, history_len);
it is stored oldest first. A behaviour among the most recent `short_len` comes from an interest
cluster with probability `short_interest_share`, one among the most recent `recent_len` (when that
is larger) with probability `recent_interest_share`, an older one with probability `interest_share`;
the interest is uniform among the user's, or with `interest_zipf` z > 0 the user's k-th interest
(k = 0, 1, ...) has weight (k + 1) ** -z. A behaviour not from an interest is, among the most recent
`recent_len` and with probability `recent_sibling_share`, from another cluster of the group of an
interest (drawn as above; uniform among the group's other clusters): category browsing, same
categories, other semantics. Otherwise it is from a random cluster. The behaviour's item is an item
of that cluster, its category (151_2_180) the item's category.

Impressions. A user gets uniform [candidates_min, candidates_max] targets. A target's cluster is an
interest cluster with probability `target_interest_share` (uniform among the user's interests),
another cluster of an interest cluster's home category with probability `target_same_category_share`
(category match without semantic match; with one cluster per category it is the interest cluster
itself), else a random cluster; the target is an item of that cluster. Its attributes 213/214 are
a fixed hash of the item (vocab 542, 121).

Clicks. With m = the user's behaviours in the target's cluster (semantically close, and of the same
category when G = 1) and s = how many of those are among the last `short_len`:
    click ~ Bernoulli(sigmoid(click_bias + long_signal_weight * log1p(m) + short_signal_weight * log1p(s))).
Only a model that reads the whole sequence and sees SCL similarity recovers m: a category match
mixes interest targets with same-category siblings, and the last `short_len` behaviours are mostly
off-interest. With the other defaults, click_bias = -4.4 gives a train click rate of about 14.5 %.

IDs and splits. Every ID is a non-zero signed int64, the splitmix64 finaliser (a bijection of the
64-bit integers that maps only 0 to 0) of (field slot << 56) + index: distinct inside a field and
across fields, never 0. Test users are new users (indices after the train users), so their IDs are
out of the user vocabulary; their histories come from the same model, so a few history items may be
out of the item vocabulary. Joined rows are grouped by user in generation order, a user's rows in
impression order; raw samples follow the joined rows and raw user features the same user order.
Vocabularies follow `muse_rec.data.vocab`, built from the train users and the item features (every
target of both splits, once).

Output. A complete set made with the same config by the same `GENERATOR` is reused. Otherwise the
set is written into a staging directory and swapped in when complete (`atomic.staged_swap`: a
failing or killed run leaves the earlier set, or after its commit point the new one), replacing
train/, test/, feature_map/ and raw/. A directory holding any of those that synth did not write
(no output marker of synth: a prepared or downloaded set, or an unmarked one of an earlier
muse_rec version) is refused before anything is deleted unless `force` (`atomic.claim_output_dir`).

Scale. Users are generated in blocks of BLOCK_USERS, each from its own seeded stream, so memory is
bounded by one block plus per-item counters, and the output does not depend on anything but the config.

The default ("classic") model and why the methods all reach its ceiling. An interest cluster holds
about 150 of a full history's 1000 behaviours, spread over its whole length, and the click logit
saturates in log1p(m): any 50 behaviours a little enriched in the target's cluster, whether picked
by category (SIM-Hard), by ID-embedding cosine (SIM-Soft) or by SCL cosine (MUSE), hold enough of
them, and the ESU scores them all by SCL cosine. So `benchmarks/quality.py` reads MUSE, SIM-Soft and
SIM-Hard within sampling noise of the oracle on it; only DIN (the last 50, mostly off-interest)
falls behind. The tests rely on this model's statistics, so it stays the default.

The separating preset (configs/synthetic_separating.yaml, the model of benchmarks/quality.py)
----------------------------------------------------------------------------------------------
Here the evidence is scarce, old, cut across categories and told through many different items, so
what each GSU retrieves of it decides the GAUC. 100 categories in 25 groups of G = 4; 2,500 clusters
of 80 items (Zipf 1.3: a popular head and a tail of rare items). Each user has 3 interests (weights
1, 0.71, 0.58) expressed mostly long ago: 15 % of the behaviours before the last 800, 2 % of the
750 before the last 50, 3 % of the last 50, which makes about 20, 14 and 12 behaviours in the three
interest clusters of a full history, spread over 4 categories each. The last 800 behaviours browse
the interests' groups (95 % of their off-interest draws): some 50 to 80 behaviours of other
clusters in each category of an interest, all newer than most of the interest's own. Targets: 40 %
interest clusters, 40 % other clusters of an interest's category (the same categories as the
evidence, none of the semantics), 20 % random; long_signal_weight 1.2. 8 % of the SCL vectors are
mislabelled. Measured on the first 512 test users of the benchmark's set (6,000 / 4,000 users,
seed 42; SIM-Soft with its embeddings after the epoch): the share of all targets' same-cluster
behaviours (m, summed) that the method's 50 positions hold:
- oracle: the true click probability.
- MUSE (SCL-cosine top-50): 82 %. It finds the target's cluster in every category and at any age.
  What it misses are the behaviours with a mislabelled SCL vector (and it takes in siblings'
  mislabelled ones) and the tail items outside the p90 vocabulary, which have no vector; with what
  one epoch does not learn, that keeps it about 0.02 GAUC below the oracle (0.025 at seed 42, 0.019
  at seed 1).
- SIM-Soft (ID-embedding cosine top-50): 22 %. After the one epoch, the cosine of two items' ID
  embeddings is the same within a cluster as across clusters at every popularity level (0.11 to
  0.16 for items seen fewer than 100 times in training, 0.27 to 0.29 above): the embeddings learn
  no semantics. What SIM-Soft finds is every earlier interaction with the target item itself
  (cosine 1 whatever the training; the popular head makes them 14 % of m) and a noisy category
  match from the category half of the embedding (about a third of its 50 positions share the
  target's category), blind to recency.
- SIM-Hard (the latest 50 of the target's category): 14 %. At most a quarter of the cluster lies in
  the target's category, and there the recent browsing fills the 50 latest slots with other
  clusters, so it sees mostly the few recent interest behaviours.
- DIN (the last 50 only): 4 %, plus the categories of the recent browsing, which tell interest and
  sibling targets (browsed categories) from random ones.
The ESU (SimTier, SA-TA) scores whatever was retrieved by SCL cosine, so these retrieval shares
order the GAUCs: MUSE > SIM-Soft > SIM-Hard > DIN, each gap several bootstrap SEs (README,
"Model quality").
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from muse_rec.config import SynthConfig
from muse_rec.data import schema
from muse_rec.data.atomic import atomic_path, claim_output_dir, mark_output, npy_memmap_writer, save_npy, staged_swap
from muse_rec.data.layout import ENTRIES, RAW_TABLES, SPLITS, DatasetLayout
from muse_rec.data.shards import ShardWriter, write_table
from muse_rec.data.vocab import coverage_vocab, sorted_vocab
from muse_rec.errors import ConfigError, DataError

log = logging.getLogger(__name__)

BLOCK_USERS = 256  # users per seeded block: part of the generative model (changing it changes the data)
SCL_CHUNK_ITEMS = 1 << 16  # items per seeded chunk of SCL noise (part of the model too)
CLUSTER_ZIPF = 0.5
CENTROID_CATEGORY_WEIGHT, CENTROID_OWN_WEIGHT = 0.6, 0.8
ITEM_NOISE = 0.6
MIN_HISTORY = 50
USER_ATTR_VOCAB = (11, 3, 49, 493, 6)  # 130_1 .. 130_5
ITEM_ATTR_VOCAB = (542, 121)  # 213, 214
USER_ATTR_MISSING_SHARE = 0.03

# Seed streams: every generator is default_rng([seed, stream, index]).
_STREAM = {"train": 0, "test": 1, "catalogue": 2, "scl": 3, "content": 4}

# ID slots: raw ID of index i in a field is mix64((slot << 56) + i).
_SLOT = {
    schema.USER: 1,
    **{name: 2 + k for k, name in enumerate(schema.USER_ATTRS)},
    schema.ITEM_MAP: 7,
    schema.CATE_MAP: 8,
    **{name: 9 + k for k, name in enumerate(schema.ITEM_ATTRS)},
}
_ITEM_ATTR_HASH_SLOT = 11  # (+k) hashes choosing each item's 213/214 value
_MISLABEL_HASH_SLOT, _SIBLING_HASH_SLOT = 13, 14  # which items get a misleading SCL vector, and which sibling
_CATEGORY_HASH_SLOT = 17  # which category of its cluster's group an item lies in (cluster_categories > 1)
_FIRST_WORD = 2  # token IDs 0 (padding) and 1 (field separator) are reserved
_SEQUENCES = (schema.HIST_ITEMS, schema.HIST_CATES)
COMMAND = "synth"  # the name in output markers and swap journals
GENERATOR = 2
"""What synth writes for a config, in the split metadata beside it: bumped when the same config gives
other files, so a set of an earlier generator is written again, not reused (2: titles whose keywords
are tokens of their own)."""


def mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser as int64: a bijection of 64-bit integers with mix64(0) = 0."""
    z = np.asarray(x, dtype=np.int64).view(np.uint64).copy()
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z.view(np.int64)


def raw_ids(field: str, index: np.ndarray) -> np.ndarray:
    """Hashed raw IDs of the field's internal indices (index >= 0): non-zero, collision-free."""
    return mix64((np.int64(_SLOT[field]) << np.int64(56)) + np.asarray(index, dtype=np.int64))


def _rng(seed: int, stream: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAM[stream], index])


# -- catalogue -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Catalogue:
    """Items, clusters, categories and their popularity: everything fixed before the users."""

    config: SynthConfig
    cluster_cdf: np.ndarray  # cumulative popularity of the clusters
    rank_cdf: np.ndarray  # cumulative Zipf weight of in-cluster ranks 0..largest cluster size - 1

    @classmethod
    def build(cls, config: SynthConfig) -> "Catalogue":
        clusters = config.categories * config.clusters_per_category
        order = _rng(config.seed, "catalogue", 0).permutation(clusters)
        cluster_weights = (order + 1.0) ** -CLUSTER_ZIPF
        largest = -(-config.items // clusters)
        rank_weights = np.arange(1, largest + 1, dtype=np.float64) ** -config.item_zipf
        return cls(config, np.cumsum(cluster_weights), np.cumsum(rank_weights))

    @property
    def num_clusters(self) -> int:
        return len(self.cluster_cdf)

    def random_clusters(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.searchsorted(self.cluster_cdf, rng.random(n) * self.cluster_cdf[-1], side="right")

    def items_of(self, rng: np.random.Generator, clusters: np.ndarray) -> np.ndarray:
        """A popularity-weighted item of each given cluster (clusters hold items c, c + C, c + 2C, ...)."""
        sizes = self.config.items // self.num_clusters + (clusters < self.config.items % self.num_clusters)
        ranks = np.searchsorted(self.rank_cdf, rng.random(len(clusters)) * self.rank_cdf[sizes - 1], side="right")
        return clusters + ranks * self.num_clusters

    def group_siblings(self, rng: np.random.Generator, clusters: np.ndarray) -> np.ndarray:
        """For each given cluster, a uniform other cluster of its category group: the clusters_per_category *
        cluster_categories clusters whose items lie in the same categories (one category's when that is 1)."""
        size = self.config.clusters_per_category * self.config.cluster_categories
        if size == 1:
            return clusters.copy()
        offset = clusters % size
        return clusters - offset + (offset + rng.integers(1, size, size=len(clusters))) % size

    def cluster_of(self, items: np.ndarray) -> np.ndarray:
        return items % self.num_clusters

    def home_category_of(self, clusters: np.ndarray) -> np.ndarray:
        """The category a cluster is numbered under (its only one when `cluster_categories` is 1)."""
        return clusters // self.config.clusters_per_category

    def category_of(self, items: np.ndarray) -> np.ndarray:
        """An item's category: its cluster's home category, or with `cluster_categories` G > 1 one of
        the G categories of the home category's group, chosen by a fixed hash of the item."""
        home = self.home_category_of(self.cluster_of(items))
        spread = self.config.cluster_categories
        if spread == 1:
            return home
        return home - home % spread + _hash_mod(_CATEGORY_HASH_SLOT, items, spread)

    def item_attr(self, k: int, items: np.ndarray) -> np.ndarray:
        """Internal value of item attribute k (213, 214): a fixed hash of the item, no signal."""
        return _hash_mod(_ITEM_ATTR_HASH_SLOT + k, items, ITEM_ATTR_VOCAB[k])

    def scl_cluster_of(self, items: np.ndarray) -> np.ndarray:
        """The cluster an item's SCL vector is drawn around: its own, or for a `scl_mislabel_share`
        of items (a fixed hash) a sibling cluster of the same category."""
        per = self.config.clusters_per_category
        own = self.cluster_of(items)
        mislabelled = _hash_mod(_MISLABEL_HASH_SLOT, items, 1 << 20) < self.config.scl_mislabel_share * (1 << 20)
        shift = 1 + _hash_mod(_SIBLING_HASH_SLOT, items, max(per - 1, 1))
        sibling = own - own % per + (own % per + shift) % per
        return np.where(mislabelled & (per > 1), sibling, own)

    def keyword(self, kind: int, index: np.ndarray) -> np.ndarray:
        """The title keyword of cluster (kind 0) or category (kind 1) `index`: a token of its own, so a
        keyword names one cluster or category (a hash into the vocabulary made 18 % of the default
        clusters share theirs and put about one other cluster's keyword among every title's filler)."""
        return _FIRST_WORD + np.asarray(index, np.int64) + (self.num_clusters if kind else 0)

    @property
    def first_filler(self) -> int:
        return first_filler(self.config)


def first_filler(config: SynthConfig) -> int:
    """Filler words are the token IDs from here to content_vocab: after every cluster's and category's keyword."""
    return _FIRST_WORD + config.categories * config.clusters_per_category + config.categories


def _hash_mod(slot: int, index: np.ndarray, modulus: int) -> np.ndarray:
    hashed = mix64((np.int64(slot) << np.int64(56)) + np.asarray(index, np.int64)).view(np.uint64)
    return (hashed % np.uint64(modulus)).astype(np.int64)


# -- users -----------------------------------------------------------------------------------------
@dataclass
class UserBlock:
    """One block of users with their histories, impressions and clicks, as internal indices."""

    users: np.ndarray  # global user index
    attrs: np.ndarray  # [B, 5] attribute value index + 1; 0 = missing
    hist_offsets: np.ndarray  # [B + 1]
    hist_items: np.ndarray  # oldest first
    target_owner: np.ndarray  # block-local user of each impression
    target_items: np.ndarray
    click_probability: np.ndarray  # the generative model's true P(click), the ceiling for any model
    clicks: np.ndarray  # int8


def generate_block(catalogue: Catalogue, rng: np.random.Generator, users: np.ndarray) -> UserBlock:
    """Draw the users' histories, impressions and clicks (the module doc's model), vectorised."""
    c = catalogue.config
    b = len(users)
    attrs = np.stack([rng.integers(1, size + 1, b) for size in USER_ATTR_VOCAB], axis=1)
    attrs[rng.random(attrs.shape) < USER_ATTR_MISSING_SHARE] = 0
    interests = catalogue.random_clusters(rng, b * c.interests_per_user).reshape(b, c.interests_per_user)

    low = min(MIN_HISTORY, c.history_len)
    partial = low + (rng.random(b) * (c.history_len - low)).astype(np.int64)
    lengths = np.where(rng.random(b) < c.full_history_share, c.history_len, partial)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    owner = np.repeat(np.arange(b), lengths)
    age = offsets[owner + 1] - np.arange(offsets[-1])  # 1 for the most recent behaviour
    recent = age <= c.short_len
    window = age <= c.recent_len
    share = np.where(recent, c.short_interest_share, np.where(window, c.recent_interest_share, c.interest_share))
    sibling_share = np.where(window | recent, c.recent_sibling_share, 0.0) if c.recent_sibling_share > 0 else None
    hist_clusters = _mixed_clusters(catalogue, rng, interests, owner, share, sibling_share)
    hist_items = catalogue.items_of(rng, hist_clusters)

    num_targets = rng.integers(c.candidates_min, c.candidates_max, endpoint=True, size=b)
    target_owner = np.repeat(np.arange(b), num_targets)
    target_clusters = _target_clusters(catalogue, rng, interests, target_owner)
    target_items = catalogue.items_of(rng, target_clusters)

    m = _same_cluster_counts(owner, hist_clusters, target_owner, target_clusters, catalogue.num_clusters)
    s = _same_cluster_counts(owner[recent], hist_clusters[recent], target_owner, target_clusters, catalogue.num_clusters)
    logit = c.click_bias + c.long_signal_weight * np.log1p(m) + c.short_signal_weight * np.log1p(s)
    probability = 1.0 / (1.0 + np.exp(-logit))
    clicks = (rng.random(len(logit)) < probability).astype(np.int8)
    return UserBlock(users, attrs, offsets, hist_items, target_owner, target_items, probability, clicks)


def split_blocks(catalogue: Catalogue, split: str) -> Iterator[UserBlock]:
    """The split's user blocks in order, each from its own seeded stream (so any block can be drawn
    again without the others: the quality benchmark re-draws the test split for its oracle)."""
    c = catalogue.config
    num_users = c.train_users if split == "train" else c.test_users
    first_user = 0 if split == "train" else c.train_users  # test users are new users
    for index, begin in enumerate(range(0, num_users, BLOCK_USERS)):
        users = np.arange(first_user + begin, first_user + min(begin + BLOCK_USERS, num_users))
        yield generate_block(catalogue, _rng(c.seed, split, index), users)


def _mixed_clusters(
    catalogue: Catalogue,
    rng: np.random.Generator,
    interests: np.ndarray,
    owner: np.ndarray,
    interest_share: np.ndarray,
    sibling_share: np.ndarray | None = None,
) -> np.ndarray:
    """Per draw: one of its user's interest clusters with probability interest_share, else a random cluster.
    The interest is uniform among the user's, or with `interest_zipf` z > 0 the k-th has weight (k + 1) ** -z.
    With `sibling_share`, an off-interest draw is instead, with that probability, another cluster of the
    drawn interest's category group (same categories, other semantics)."""
    count, zipf = interests.shape[1], catalogue.config.interest_zipf
    if zipf == 0:
        which = rng.integers(count, size=len(owner))
    else:
        cdf = np.cumsum(np.arange(1, count + 1, dtype=np.float64) ** -zipf)
        which = np.searchsorted(cdf, rng.random(len(owner)) * cdf[-1], side="right")
    clusters = interests[owner, which]
    off_interest = np.flatnonzero(rng.random(len(owner)) >= interest_share)
    interest_clusters = clusters[off_interest]
    clusters[off_interest] = catalogue.random_clusters(rng, len(off_interest))
    if sibling_share is not None:
        to_sibling = rng.random(len(off_interest)) < sibling_share[off_interest]
        clusters[off_interest[to_sibling]] = catalogue.group_siblings(rng, interest_clusters[to_sibling])
    return clusters


def _target_clusters(catalogue: Catalogue, rng: np.random.Generator, interests: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Interest cluster, a sibling cluster of an interest's category, or a random cluster."""
    c = catalogue.config
    per = c.clusters_per_category
    u = rng.random(len(owner))
    interest = interests[owner, rng.integers(interests.shape[1], size=len(owner))]
    shift = rng.integers(1, max(per, 2), size=len(owner))
    sibling = interest - interest % per + (interest % per + shift) % per
    random = catalogue.random_clusters(rng, len(owner))
    share = c.target_interest_share
    return np.where(u < share, interest, np.where(u < share + c.target_same_category_share, sibling, random))


def _same_cluster_counts(
    owner: np.ndarray, clusters: np.ndarray, target_owner: np.ndarray, target_clusters: np.ndarray, num_clusters: int
) -> np.ndarray:
    """For each target, how many of its user's given behaviours lie in the target's cluster.

    Clusters are renumbered to those of the block's targets (plus one column for all others), so the
    (user, cluster) count table has users x target-clusters cells however large the catalogue is.
    """
    target_cluster_ids, target_columns = np.unique(target_clusters, return_inverse=True)
    width = len(target_cluster_ids) + 1
    column_of = np.full(num_clusters, width - 1)
    column_of[target_cluster_ids] = np.arange(width - 1)
    num_users = int(target_owner.max()) + 1
    counts = np.bincount(owner * width + column_of[clusters], minlength=num_users * width)
    return counts[target_owner * width + target_columns]


# -- tables ----------------------------------------------------------------------------------------
def _list_array(offsets: np.ndarray, values: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, value_type))


def user_columns(catalogue: Catalogue, block: UserBlock) -> dict[str, np.ndarray]:
    """Raw-ID columns of the block's users; the two sequences as flat values (see block.hist_offsets)."""
    return {
        schema.USER: raw_ids(schema.USER, block.users),
        **{
            name: np.where(block.attrs[:, k] > 0, raw_ids(name, block.attrs[:, k]), 0)
            for k, name in enumerate(schema.USER_ATTRS)
        },
        schema.HIST_ITEMS: raw_ids(schema.ITEM_MAP, block.hist_items),
        schema.HIST_CATES: raw_ids(schema.CATE_MAP, catalogue.category_of(block.hist_items)),
    }


def user_table(block: UserBlock, users: dict[str, np.ndarray]) -> pa.Table:
    """The block's rows of a raw user-features table (schema.RAW_USER_SCHEMA)."""
    columns = [
        _list_array(block.hist_offsets, users[name], pa.int64()) if name in _SEQUENCES else users[name]
        for name in schema.RAW_USER_SCHEMA.names
    ]
    return pa.Table.from_arrays(columns, schema=schema.RAW_USER_SCHEMA)


def joined_table(catalogue: Catalogue, block: UserBlock, users: dict[str, np.ndarray]) -> pa.Table:
    """Impressions LEFT JOIN user features LEFT JOIN item features: the block's shard rows."""
    owner = block.target_owner
    rows_per_user = np.bincount(owner, minlength=len(block.users))
    columns = {
        name: _list_array(*repeat_segments(values, block.hist_offsets, rows_per_user), pa.int64())
        if name in _SEQUENCES
        else values[owner]
        for name, values in users.items()
    }
    target, target_cate, *attrs = item_columns(catalogue, block.target_items)
    columns |= {schema.LABEL: labels_array(block.clicks), schema.TARGET_ITEM: target, schema.TARGET_CATE: target_cate}
    columns |= dict(zip(schema.ITEM_ATTRS, attrs))
    return pa.Table.from_arrays([columns[name] for name in schema.JOINED_SCHEMA.names], schema=schema.JOINED_SCHEMA)


def repeat_segments(values: np.ndarray, offsets: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and values of a list column holding segment k (values[offsets[k]:offsets[k + 1]]) times[k] times.

    One broadcast copy per segment (a user's sequence; a few hundred per block) runs several times
    faster than a gather through a per-value index, and an order of magnitude faster than Arrow's `take`.
    """
    lengths = np.diff(offsets)
    out_offsets = np.concatenate([[0], np.cumsum(np.repeat(lengths, times))])
    out = np.empty(out_offsets[-1], values.dtype)
    start = 0
    for begin, end, n in zip(offsets[:-1].tolist(), offsets[1:].tolist(), times.tolist()):
        stop = start + n * (end - begin)
        out[start:stop].reshape(n, end - begin)[:] = values[begin:end]
        start = stop
    return out_offsets, out


def labels_array(clicks: np.ndarray) -> pa.ListArray:
    """One-hot [1, 0] / [0, 1] labels of the clicks."""
    one_hot = np.stack([1 - clicks, clicks], axis=1).astype(np.int8).reshape(-1)
    return _list_array(np.arange(0, len(one_hot) + 1, 2), one_hot, pa.int8())


def item_columns(catalogue: Catalogue, items: np.ndarray) -> list[np.ndarray]:
    """205, 206, 213, 214 of the given items: the item-features columns."""
    return [
        raw_ids(schema.ITEM_MAP, items),
        raw_ids(schema.CATE_MAP, catalogue.category_of(items)),
        *[raw_ids(name, catalogue.item_attr(k, items)) for k, name in enumerate(schema.ITEM_ATTRS)],
    ]


def samples_table(joined: pa.Table) -> pa.Table:
    return joined.select(schema.RAW_SAMPLES_SCHEMA.names)


@contextlib.contextmanager
def _table_stream(path: Path, table_schema: pa.Schema, row_group_rows: int) -> Iterator[Callable[[pa.Table], None]]:
    """Append tables to one raw parquet file (as `write_table` writes it) renamed into place when complete."""
    with atomic_path(path) as tmp:
        writer = pq.ParquetWriter(tmp, table_schema, compression="zstd", use_dictionary=False)
        try:
            yield lambda table: writer.write_table(table, row_group_size=row_group_rows)
        finally:
            writer.close()


# -- vocabulary statistics -------------------------------------------------------------------------
@dataclass
class VocabStats:
    """What the vocabularies need, accumulated block by block in bounded memory."""

    item_counts: np.ndarray  # train history count per item (each user once)
    attr_seen: list[np.ndarray]  # bool per value index (0 = missing) of each user attribute
    is_target: np.ndarray  # bool per item: a target in either split
    train_users: int = 0

    @classmethod
    def empty(cls, config: SynthConfig) -> "VocabStats":
        return cls(
            np.zeros(config.items, np.int64),
            [np.zeros(size + 1, bool) for size in USER_ATTR_VOCAB],
            np.zeros(config.items, bool),
        )

    def add(self, block: UserBlock, split: str) -> None:
        self.is_target[block.target_items] = True
        if split != "train":
            return
        self.item_counts += np.bincount(block.hist_items, minlength=len(self.item_counts))
        for seen, values in zip(self.attr_seen, block.attrs.T):
            seen[values] = True
        self.train_users += len(block.users)


# -- writing ---------------------------------------------------------------------------------------
@dataclass
class SplitResult:
    writer: ShardWriter  # still open: closing it writes metadata.json, the mark of a complete split
    rows: int
    clicks: int


class RawSinks(NamedTuple):
    """Streams of one split's raw tables (written in joined-row and user order)."""

    samples: Callable[[pa.Table], None]
    users: Callable[[pa.Table], None]


def _write_split(
    layout: DatasetLayout, catalogue: Catalogue, split: str, stats: VocabStats, progress: bool
) -> SplitResult:
    """Generate and write one split block by block; the shard writer is left open (metadata last)."""
    c = catalogue.config
    num_users = c.train_users if split == "train" else c.test_users
    writer = ShardWriter(
        layout, split, c.rows_per_shard, c.row_group_rows, extra_metadata={"synth": dataclasses.asdict(c), "synth_generator": GENERATOR}
    )
    rows = clicks = 0
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        raw = _raw_sinks(layout, split, c, stack)
        with tqdm(total=num_users, desc=f"synth {split}", unit="user", disable=not progress) as bar:
            for block in split_blocks(catalogue, split):
                users_raw = user_columns(catalogue, block)
                joined = joined_table(catalogue, block, users_raw)
                writer.write(joined)
                if raw is not None:
                    raw.samples(samples_table(joined))
                    raw.users(user_table(block, users_raw))
                stats.add(block, split)
                rows += joined.num_rows
                clicks += int(block.clicks.sum())
                bar.update(len(block.users))
    seconds = time.perf_counter() - start
    log.info("%s: %d users, %d rows in %.1f s (%.0f rows/s)", split, num_users, rows, seconds, rows / max(seconds, 1e-9))
    return SplitResult(writer, rows, clicks)


def _raw_sinks(layout: DatasetLayout, split: str, config: SynthConfig, stack: contextlib.ExitStack) -> RawSinks | None:
    """The split's raw samples and user-features streams, closed by `stack` (None unless config.raw)."""
    if not config.raw:
        return None
    return RawSinks(
        *(
            stack.enter_context(_table_stream(layout.raw_table(f"{split}_{name}"), table_schema, config.row_group_rows))
            for name, table_schema in (("samples", schema.RAW_SAMPLES_SCHEMA), ("user_features", schema.RAW_USER_SCHEMA))
        )
    )


def _write_vocabularies(layout: DatasetLayout, catalogue: Catalogue, stats: VocabStats) -> None:
    """Every sorted map (full and p90 items), and the raw item-features table when asked."""
    c = catalogue.config
    targets = np.flatnonzero(stats.is_target)
    target_columns = item_columns(catalogue, targets)
    history = np.flatnonzero(stats.item_counts)
    history_ids = raw_ids(schema.ITEM_MAP, history)
    seen_categories = raw_ids(schema.CATE_MAP, np.unique(catalogue.category_of(history)))
    maps = {
        schema.USER: sorted_vocab(raw_ids(schema.USER, np.arange(stats.train_users))),
        **{
            name: sorted_vocab(raw_ids(name, np.flatnonzero(seen[1:]) + 1))
            for name, seen in zip(schema.USER_ATTRS, stats.attr_seen)
        },
        schema.ITEM_MAP: sorted_vocab(history_ids, target_columns[0]),
        schema.CATE_MAP: sorted_vocab(seen_categories, target_columns[1]),
        **{name: sorted_vocab(column) for name, column in zip(schema.ITEM_ATTRS, target_columns[2:])},
    }
    for field, keys in maps.items():
        save_npy(layout.map_path(field, "full"), keys)
    p90 = coverage_vocab(history_ids, stats.item_counts[history], target_columns[0], c.coverage)
    save_npy(layout.map_path(schema.ITEM_MAP, "p90"), p90)
    if c.raw:
        item_table = pa.Table.from_arrays(target_columns, schema=schema.RAW_ITEM_SCHEMA)
        write_table(layout.raw_table("item_features"), item_table, c.row_group_rows)
    _write_scl(layout, catalogue, p90)
    _write_content(layout, catalogue)


def _write_content(layout: DatasetLayout, catalogue: Catalogue) -> None:
    """feature_map/item_content.parquet: every catalogue item's title, `title_tokens` tokens: its
    cluster's keyword and its category's keyword at random positions among filler words (uniform
    over the tokens no keyword owns). The cluster keyword names the item's true cluster, which a
    mislabelled SCL vector hides.
    Rows in raw-ID order, drawn in chunks of SCL_CHUNK_ITEMS rows from their own seeded streams."""
    c = catalogue.config
    ids = raw_ids(schema.ITEM_MAP, np.arange(c.items))
    order = np.argsort(ids)  # internal items in raw-ID order
    with _table_stream(layout.item_content_path, schema.CONTENT_SCHEMA, c.row_group_rows) as sink:
        for chunk, begin in enumerate(range(0, c.items, SCL_CHUNK_ITEMS)):
            items = order[begin : begin + SCL_CHUNK_ITEMS]
            rng = _rng(c.seed, "content", chunk)
            tokens = rng.integers(catalogue.first_filler, c.content_vocab, size=(len(items), c.title_tokens), dtype=np.int64)
            slots = np.argsort(rng.random((len(items), c.title_tokens)), axis=1)[:, :2]  # two distinct positions
            every = np.arange(len(items))
            tokens[every, slots[:, 0]] = catalogue.keyword(0, catalogue.cluster_of(items))
            tokens[every, slots[:, 1]] = catalogue.keyword(1, catalogue.category_of(items))
            titles = _list_array(np.arange(len(items) + 1) * c.title_tokens, tokens.reshape(-1).astype(np.int32), pa.int32())
            sink(pa.Table.from_arrays([ids[items], titles], schema=schema.CONTENT_SCHEMA))


def _write_scl(layout: DatasetLayout, catalogue: Catalogue, keys: np.ndarray) -> None:
    """SCL vectors of the p90 items, rows in key order (and the raw SCL table when asked).

    Noise is drawn per chunk of SCL_CHUNK_ITEMS internal items from its own seeded stream, so an
    item's vector does not depend on which other items are in the table.
    """
    c = catalogue.config
    internal = _internal_items(keys, c.items)
    by_item = np.argsort(internal)  # rows of the table, in internal item order
    chunk_starts = np.arange(0, c.items + SCL_CHUNK_ITEMS, SCL_CHUNK_ITEMS)
    bounds = np.searchsorted(internal[by_item], chunk_starts)
    centroids = _cluster_centroids(catalogue)
    save_npy(layout.scl_keys_path, keys)
    with npy_memmap_writer(layout.scl_values_path, (len(keys), schema.SCL_DIM), np.dtype(np.int8)) as values:
        for chunk, begin in enumerate(chunk_starts[:-1]):
            rows = by_item[bounds[chunk] : bounds[chunk + 1]]
            shape = (min(SCL_CHUNK_ITEMS, c.items - begin), schema.SCL_DIM)
            noise = _rng(c.seed, "scl", 1 + chunk).standard_normal(shape, dtype=np.float32)
            items = internal[rows]
            vectors = centroids[catalogue.scl_cluster_of(items)] + noise[items - begin] * (ITEM_NOISE / np.sqrt(schema.SCL_DIM))
            values[rows] = quantise(_unit(vectors))
    if c.raw:
        _write_raw_scl(layout, keys, c.row_group_rows)


def _internal_items(keys: np.ndarray, num_items: int) -> np.ndarray:
    """Internal indices of the given item raw IDs (all in the catalogue), in the same order."""
    all_ids = raw_ids(schema.ITEM_MAP, np.arange(num_items))
    order = np.argsort(all_ids)
    return order[np.searchsorted(all_ids[order], keys)]


def _cluster_centroids(catalogue: Catalogue) -> np.ndarray:
    """Unit centroid of each cluster, near its home category's direction (with `cluster_categories`
    G > 1: the direction of the first category of the home category's group, shared by the group)."""
    rng = _rng(catalogue.config.seed, "scl", 0)
    categories = _unit(rng.standard_normal((catalogue.config.categories, schema.SCL_DIM)))
    own = _unit(rng.standard_normal((catalogue.num_clusters, schema.SCL_DIM)))
    home = catalogue.home_category_of(np.arange(catalogue.num_clusters))
    of_cluster = home - home % catalogue.config.cluster_categories
    return _unit(CENTROID_CATEGORY_WEIGHT * categories[of_cluster] + CENTROID_OWN_WEIGHT * own)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def quantise(unit_vectors: np.ndarray) -> np.ndarray:
    """The release's int8 storage of L2-normalised vectors: trunc(clip(v, -1, 1) * 127)."""
    return np.trunc(np.clip(unit_vectors, -1.0, 1.0) * 127).astype(np.int8)


def _write_raw_scl(layout: DatasetLayout, keys: np.ndarray, row_group_rows: int) -> None:
    values = np.load(layout.scl_values_path, mmap_mode="r")
    with _table_stream(layout.raw_table("scl_embedding_int8_p90"), schema.RAW_SCL_SCHEMA, row_group_rows) as sink:
        for begin in range(0, len(keys), SCL_CHUNK_ITEMS):
            rows = np.asarray(values[begin : begin + SCL_CHUNK_ITEMS])
            vectors = _list_array(np.arange(len(rows) + 1) * schema.SCL_DIM, rows.reshape(-1), pa.int8())
            sink(pa.Table.from_arrays([keys[begin : begin + len(rows)], vectors], schema=schema.RAW_SCL_SCHEMA))


# -- completeness, summary -----------------------------------------------------------------------
def _map_paths(layout: DatasetLayout) -> list[Path]:
    return [
        *(layout.map_path(field, "full") for field in schema.FEATURE_MAPS),
        layout.map_path(schema.ITEM_MAP, "p90"),
        layout.scl_keys_path,
        layout.scl_values_path,
        layout.item_content_path,
    ]


def _is_complete(layout: DatasetLayout, config: SynthConfig) -> bool:
    """Both splits' metadata made with this config (written last) and every map present."""
    raw = [layout.raw_table(name) for name in RAW_TABLES] if config.raw else []
    made_here = all(_made_with(layout, split, config) for split in SPLITS)
    return made_here and all(path.exists() for path in [*_map_paths(layout), *raw])


def _made_with(layout: DatasetLayout, split: str, config: SynthConfig) -> bool:
    try:
        metadata = layout.read_metadata(split)
        return metadata.get("synth") == dataclasses.asdict(config) and metadata.get("synth_generator") == GENERATOR
    except DataError:  # missing or unreadable: not a complete split
        return False


def _summary(layout: DatasetLayout, seconds: float, reused: bool) -> dict:
    """What was written, read back from the files (the same for a fresh and a reused data set)."""
    splits = {}
    for split in SPLITS:
        meta = layout.read_metadata(split)
        splits[split] = {"rows": meta["total_rows"], "users": meta["users"], "click_rate": meta["click_rate"]}
    vocab_sizes = {field: int(np.load(layout.map_path(field, "full"), mmap_mode="r").shape[0]) for field in schema.FEATURE_MAPS}
    vocab_sizes[f"{schema.ITEM_MAP}_p90"] = int(np.load(layout.map_path(schema.ITEM_MAP, "p90"), mmap_mode="r").shape[0])
    rows = sum(s["rows"] for s in splits.values())
    return {
        "out": str(layout.root),
        "splits": splits,
        "vocab_sizes": vocab_sizes,
        "seconds": round(seconds, 3),
        "rows_per_second": None if reused else round(rows / max(seconds, 1e-9)),
        "reused": reused,
    }


def _check_config(config: SynthConfig) -> None:
    """Refuse, before anything is written, a config the model cannot draw from; the error names the key."""
    clusters = config.categories * config.clusters_per_category
    shares = (
        "full_history_share", "interest_share", "short_interest_share", "recent_interest_share", "recent_sibling_share",
        "target_interest_share",
    )
    problems = {
        "categories": (config.categories >= 1, "at least 1"),
        "clusters_per_category": (config.clusters_per_category >= 1, "at least 1"),
        "cluster_categories": (
            config.cluster_categories >= 1 and config.categories % config.cluster_categories == 0,
            f"at least 1 and a divisor of categories = {config.categories}",
        ),
        "items": (config.items >= clusters, f"at least categories * clusters_per_category = {clusters} (every cluster needs an item)"),
        "interests_per_user": (config.interests_per_user >= 1, "at least 1"),
        "history_len": (config.history_len >= 1, "at least 1"),
        "recent_len": (config.recent_len >= 0, "at least 0"),
        "interest_zipf": (config.interest_zipf >= 0, "at least 0"),
        "short_len": (config.short_len >= 0, "at least 0"),
        "candidates_min": (1 <= config.candidates_min <= config.candidates_max, "between 1 and candidates_max"),
        "train_users": (config.train_users >= 1, "at least 1"),
        "test_users": (config.test_users >= 1, "at least 1"),
        **{key: (0.0 <= getattr(config, key) <= 1.0, "a probability in [0, 1]") for key in shares},
        "target_same_category_share": (
            0.0 <= config.target_same_category_share <= 1.0 - config.target_interest_share,
            "a probability in [0, 1 - target_interest_share]",
        ),
        "coverage": (0.0 < config.coverage <= 1.0, "a share in (0, 1]"),
        "scl_mislabel_share": (0.0 <= config.scl_mislabel_share <= 1.0, "a probability in [0, 1]"),
        "content_vocab": (
            config.content_vocab > first_filler(config),
            f"more than {first_filler(config)} (tokens 0 and 1 are reserved, then a keyword for each "
            f"of the {clusters} clusters and {config.categories} categories, and at least one filler word)",
        ),
        "title_tokens": (config.title_tokens >= 2, "at least 2 (a cluster and a category keyword)"),
    }
    for key, (ok, expected) in problems.items():
        if not ok:
            raise ConfigError(f"config key synth.{key}: expected {expected}, found {getattr(config, key)!r}")


def synthesize(
    config: SynthConfig, out: str | Path, progress: bool = True, force: bool = False, elsewhere: str = "choose another --out"
) -> dict:
    """Write the synthetic data set to `out` (or reuse it if complete with this config); returns a summary.

    `force` replaces a data set synth did not write; `elsewhere` says, in the refusal, how else to
    proceed (the module doc's Output).
    """
    _check_config(config)
    layout = DatasetLayout(out)
    params = dataclasses.asdict(config)
    start = time.perf_counter()
    if _is_complete(layout, config):  # exactly what this run would write; an unmarked one of an earlier muse_rec is adopted
        with contextlib.suppress(OSError):  # a read-only copy is reused as it is
            mark_output(layout.root, COMMAND, params)
        log.info("%s already holds a complete synthetic data set made with this config: reusing it", layout.root)
        return _summary(layout, time.perf_counter() - start, reused=True)
    claim_output_dir(layout.root, COMMAND, params, ENTRIES, force, elsewhere)
    catalogue = Catalogue.build(config)
    stats = VocabStats.empty(config)
    with staged_swap(layout.root, COMMAND, ENTRIES) as staging_root:
        staging = DatasetLayout(staging_root)
        results = {split: _write_split(staging, catalogue, split, stats, progress) for split in SPLITS}
        _write_vocabularies(staging, catalogue, stats)
        for split, result in results.items():
            users = config.train_users if split == "train" else config.test_users
            result.writer.extra_metadata |= {"users": users, "click_rate": result.clicks / max(result.rows, 1)}
            result.writer.close()
    mark_output(layout.root, COMMAND, params)
    summary = _summary(layout, time.perf_counter() - start, reused=False)
    log.info("synthetic data set in %s: %s", layout.root, summary)
    return summary
