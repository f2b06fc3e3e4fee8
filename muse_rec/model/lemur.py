"""Method `lemur`: MUSE's GSU and ESU over item representations from a jointly trained content
encoder and its memory bank, instead of frozen SCL vectors (shared/spec/lemur.md).

Per training step, on each rank:
1. `TargetEncoding`: a random share p (`encode_share`) of the samples encode their target item,
   each distinct item once; a share q <= p (`backward_share`) keeps the gradient. The fresh values
   are written to the bank (every rank's, through an all-gather) *before* anything reads it, with
   a bounded refresh (`refresh_rows`: the history rows this batch reads most, or a sweep of the
   rows this rank holds) re-encoded without gradient. Before the first step the warm start
   (`muse_rec.distributed.warm_start`) has filled the bank with the items the training reads.
2. The bank is read like any TorchRec table: the 1000-long history (no gradient, no encoder) and
   the targets of the samples outside the p share.
3. The representations take the SCL vectors' place: cosine top-K GSU
   (`Retrieval.cosine_positions`, in the model: `model.gsu_stage` is 'model' for lemur), then the
   ID tables are looked up at the targets and the kept and last positions alone
   (`MuseModel.kept_inputs`), SimTier and SA-TA; the tower also reads the target's representation
   and (`sorted_similarities`) its largest cosines to the history, the path by which the ranking
   loss trains the encoder. A never-written item reads as zeros: its cosine is 0, so
   the GSU ranks it below every written item (the reference's score for zero vectors) and SimTier
   counts it at cosine 0. With `keep_scl` the GSU, SimTier and SA-TA stay MUSE's, on the loader's
   SCL cosines, and the representations join the tower beside them: the target's, and a SimTier
   histogram of its cosines to the whole long history (the paper adds LEMUR's features to its base
   ranker).
4. Loss = ranking_weight * click loss + contrastive_weight * in-batch InfoNCE between a user vector
   and the clicked target's representation (`InBatchContrastive`).
Evaluation never writes the bank; with `eval_target: bank` it runs no encoder at all.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingCollection

from muse_rec import schema
from muse_rec.batch import Batch
from muse_rec.config import LemurConfig, ModelConfig
from muse_rec.model import gsu
from muse_rec.model.encoder import OUTPUT_DIM, ContentEncoder, OutputCentring
from muse_rec.model.esu import SimTier, attention_pool
from muse_rec.model.memory_bank import PAIR_STATS, READ_STATS, BankWriter, StatSums, bank_table_config, missing
from muse_rec.model.muse import MuseDense, MuseModel
from muse_rec.model.tower import two_class_loss_and_prob


_MASK32 = 0xFFFFFFFF


def _local_sum(x: torch.Tensor) -> torch.Tensor:
    return x


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) of int64 tensors holding values in [0, 2^32);
    every product stays below 2^63, so nothing overflows."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _MASK32
    return x ^ (x >> 16)


def step_uniforms(seed: int, step: torch.Tensor, n: int) -> torch.Tensor:
    """n uniforms in [0, 1) that are a function of (seed, step, index) alone, computed on `step`'s
    device from the step tensor itself: no host read of the step (a device sync on CUDA)."""
    base = _mix32(((seed & _MASK32) * 0x27D4EB2F + (step & _MASK32) * 0x165667B1) & _MASK32)
    index = torch.arange(n, device=step.device, dtype=torch.int64)
    return (_mix32(_mix32(base ^ index)) >> 8).to(torch.float32) / float(1 << 24)


class TargetEncoding(nn.Module):
    """Encodes target items and writes them to the bank, refreshes a bounded number of bank rows
    each training step; optionally encodes the history too (the cost baseline `history_source:
    encoder`). A leaf of TorchRec's pipeline tracer: it holds no TorchRec module, so its
    data-dependent selection runs eagerly."""

    def __init__(self, config: LemurConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ContentEncoder(config)
        self.encoder.requires_grad_(config.train_encoder)
        if not config.train_encoder:
            self.encoder.eval()
        if self.centring is not None:
            self.centring.deferred = True  # moved once a step by the mean over all ranks: `forward`
        self.reduce: Callable[[torch.Tensor], torch.Tensor] = _local_sum  # an all-reduce once bound to the ranks
        self.writer = BankWriter()
        self.register_buffer("tokens", torch.zeros(0, config.max_tokens, dtype=torch.int32), persistent=False)
        self.content_source: Callable[[torch.Tensor], torch.Tensor] | None = None  # content_input=scl: rows -> SCL values
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))  # training steps drawn: checkpointed,
        # so a resumed run draws exactly the p / q shares (and sweeps the rows) the uninterrupted run would have
        self.draw_seed = 0

    @property
    def centring(self) -> OutputCentring | None:
        return self.encoder.centring if isinstance(self.encoder.centring, OutputCentring) else None

    def train(self, mode: bool = True) -> "TargetEncoding":
        """A frozen encoder (train_encoder false) always runs as in evaluation: its output is a
        function of the item alone (running-mean centring), so the bank it fills never goes stale."""
        super().train(mode)
        if not self.config.train_encoder:
            self.encoder.eval()
        return self

    def set_tokens(self, tokens: torch.Tensor) -> None:
        """The (item rows, max_tokens) token matrix of `muse_rec.data.content`; content_input=tokens."""
        too_large = int(tokens.max()) if tokens.numel() else 0
        if too_large >= self.config.vocab_size:
            raise ValueError(f"item content holds token ID {too_large}, but model.lemur.vocab_size is {self.config.vocab_size}")
        self.tokens = tokens

    def set_content_source(self, source: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """content_input=scl: a function from item rows (N,) to their (N, 128) SCL values, for encoding
        items that are not this batch's targets (warm start, refresh); targets keep their looked-up
        vectors. `muse_rec.distributed.warm_start.scl_content_source` reads the memory-mapped values
        file (shared by the ranks of a host through the page cache), so no rank holds a copy."""
        self.content_source = source

    def seed(self, seed: int) -> None:
        """Seed of the p / q draws (give each rank its own); step s draws from seed and s alone."""
        self.draw_seed = seed

    def forward(
        self, rows: torch.Tensor, scl: torch.Tensor, weights: torch.Tensor, history_rows: torch.Tensor, history_scl: torch.Tensor,
        pairs: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """rows (B,) target item rows, scl (B, 128) their SCL vectors, weights (B,) (0 = padding row),
        pairs (P, 3) the co-occurrence pairs (`Batch.cooccurrence`).
        Returns the encoded targets (B, 128; zero where not encoded), which were encoded (B,) bool,
        which could be (B,) bool: a real item of a real sample (the rest read the bank), with
        `history_source: encoder` the encoded history (B, L, 128) (else an empty tensor), and in
        training with `LemurConfig.trains_on_pairs` the pairs' representations (P, 2, 128), with
        gradient (else empty). Pairs are encoded first, so the step's centring mean, committed at
        the end, has them."""
        c = self.config
        pair_values = scl.new_zeros(0, 2, OUTPUT_DIM)
        if self.training and c.trains_on_pairs:
            pair_values = self._encode_items(pairs[:, :2].reshape(-1)).view(-1, 2, OUTPUT_DIM)
        target = scl.new_zeros(rows.numel(), OUTPUT_DIM)
        encodable = (rows != 0) & (weights > 0)
        if not self.training:
            encoded = encodable & (c.eval_target == "encoder")
            if c.eval_target == "encoder":
                target = target.index_put((encoded,), self.encode(rows[encoded], scl[encoded], grad=False)[0])
        else:
            draw = self._draw(rows.numel()).to(rows.device)
            encoded = encodable & (draw < c.encode_share)
            with_grad = encoded & (draw < c.backward_share) & c.train_encoder
            written = target.clone()  # the values stored: centred by the running mean, as the bank's other rows
            if c.train_encoder:  # even with no row selected: DDP expects the encoder in every rank's graph
                values, shift = self.encode(rows[with_grad], scl[with_grad], grad=True)
                target = target.index_put((with_grad,), values)
                written = written.index_put((with_grad,), values.detach() + shift)
            target, written = self._encode_the_rest(target, written, rows, scl, encoded, with_grad)
            refresh = self._most_read(history_rows, rows[encoded]) if c.refresh_rows and c.refresh_policy == "most_read" else None
            self.writer(rows[encoded], written[encoded], *(refresh or ()))
            if c.refresh_rows and c.refresh_policy == "oldest":
                self._sweep()
        history = scl.new_zeros(0)
        if c.history_source == "encoder":
            flat = self.encode(history_rows.reshape(-1), history_scl.reshape(-1, OUTPUT_DIM), grad=self.training and c.train_encoder)[0]
            history = (flat * (history_rows.reshape(-1, 1) != 0)).view(*history_rows.shape, OUTPUT_DIM)
        if self.training and self.centring is not None:  # collective: every rank, once a training step
            self.centring.commit(self.reduce)
        return target, encoded, encodable, history, pair_values

    def encode(self, rows: torch.Tensor, scl: torch.Tensor, grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Representations (N, 128) of items `rows` (N,), each distinct item encoded once, and the
        (128,) shift that centres them by the running mean instead of their batch's (the values to
        store in the bank: `OutputCentring.last_shift`; zero outside training)."""
        unique, inverse = torch.unique(rows, return_inverse=True)
        if self.config.content_input == "tokens":
            content = self.tokens[unique.to(self.tokens.device)].to(rows.device)
        else:  # the SCL vector of one sample of each item (all samples of an item carry the same one)
            first = torch.full((unique.numel(),), rows.numel(), dtype=torch.long, device=rows.device)
            first.scatter_reduce_(0, inverse, torch.arange(rows.numel(), device=rows.device), reduce="amin")
            content = scl[first]
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            values = self.encoder(content)[inverse]
        centring = self.centring
        return values, (centring.last_shift if centring is not None else values.new_zeros(OUTPUT_DIM))

    @torch.no_grad()
    def encode_for_bank(self, rows: torch.Tensor) -> torch.Tensor:
        """Bank values (N, 128) of distinct item rows (N,), from the item content matrix, without
        gradient (`ContentEncoder.encode_for_bank`): the warm start and the refresh."""
        return self.encoder.encode_for_bank(self._content(rows))

    @torch.no_grad()
    def reencode_held(self) -> torch.Tensor:
        """Every written bank row this rank holds re-encoded by the current encoder and stored in place,
        in chunks of `warm_start_chunk`, without gradient and without exchange (each rank its own
        rows, so each item is encoded once); never-written rows stay missing. Returns (2,): the sum of
        cosine(new, cached value) over the rows re-encoded, and their count (this rank's)."""
        count, chunk = self.writer.held_count, self.config.warm_start_chunk
        staleness = torch.zeros(2, dtype=torch.float64, device=self.writer.stats.device)
        for start in range(0, count, chunk):
            positions = torch.arange(start, min(start + chunk, count), device=self.steps.device)
            rows = self.writer.held_rows(positions)
            staleness += self.writer.store_local(rows, self.encode_for_bank(rows), only_written=True, counted=False).to(staleness)
        return staleness

    def _encode_items(self, rows: torch.Tensor) -> torch.Tensor:
        """Representations (N, 128) of item rows (N,) from the item content, with gradient (the
        co-occurrence pairs), each distinct item encoded once; in training centred by their batch's
        mean like the targets."""
        unique, inverse = torch.unique(rows, return_inverse=True)
        return self.encoder(self._content(unique))[inverse]

    def calibrate_centring(self, rows: torch.Tensor) -> bool:
        """`ContentEncoder.calibrate_centring` on these items (the warm start's sample)."""
        return self.encoder.calibrate_centring(self._content(rows))

    def _content(self, rows: torch.Tensor) -> torch.Tensor:
        """The encoder input of item rows: title tokens, or (content_input=scl) SCL values."""
        if self.config.content_input == "tokens":
            return self.tokens[rows.to(self.tokens.device)].to(rows.device)
        if self.content_source is None:
            raise RuntimeError("content_input=scl: set_content_source was not called (the warm start and the refresh encode items from it)")
        return self.content_source(rows).to(rows.device).float()

    def _most_read(self, history_rows: torch.Tensor, written: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """refresh_policy most_read: the `refresh_rows` distinct rows this rank's batch reads most
        often (ties: the lower row), leaving out this step's encoded targets; re-encoded without
        gradient, they are written with the targets, before the bank is read."""
        flat = history_rows.reshape(-1)
        unique, counts = torch.unique(flat[flat != 0], return_counts=True)
        counts = counts * ~torch.isin(unique, written)
        take = min(self.config.refresh_rows, unique.numel())
        key = counts * (1 << 36) + ((1 << 36) - 1 - unique)  # most read first, then the lower row
        top = torch.topk(key, take).indices
        chosen = unique[top[counts[top] > 0]]
        return chosen, self.encode_for_bank(chosen)

    def _sweep(self) -> None:
        """refresh_policy oldest: a cyclic sweep over the bank rows this rank holds, `refresh_rows`
        a step, so each is re-encoded every (rows held / refresh_rows) steps and the rows swept are
        those swept longest ago. Local: the rows are this rank's, no exchange; a never-written row
        stays missing. The position follows the checkpointed step count."""
        count = self.writer.held_count
        if not count:
            return
        take = min(self.config.refresh_rows, count)
        positions = ((self.steps - 1) * take + torch.arange(take, device=self.steps.device)) % count
        rows = self.writer.held_rows(positions)
        self.writer.store_local(rows, self.encode_for_bank(rows), only_written=True)

    def _encode_the_rest(
        self, target: torch.Tensor, written: torch.Tensor, rows: torch.Tensor, scl: torch.Tensor, encoded: torch.Tensor, with_grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The p share outside q, without gradient: an item already encoded with gradient this step
        takes that value (detached) instead of running the encoder a second time. Returns the
        targets and the values to store (`forward`)."""
        without = encoded & ~with_grad
        if not without.any():
            return target, written
        samples = with_grad.nonzero().squeeze(-1)
        items, inverse = torch.unique(rows[samples], return_inverse=True)
        done = torch.isin(rows, items) & without
        if done.any():  # the value of any with-gradient sample of the same item (all are equal)
            source = torch.empty_like(items).scatter_(0, inverse, samples)[torch.searchsorted(items, rows[done])]
            target = target.index_put((done,), target[source].detach())
            written = written.index_put((done,), written[source])
        fresh = without & ~done
        if fresh.any():
            values, shift = self.encode(rows[fresh], scl[fresh], grad=False)
            target = target.index_put((fresh,), values)
            written = written.index_put((fresh,), values + shift)
        return target, written

    def _draw(self, n: int) -> torch.Tensor:
        """n uniforms for this training step, from (seed, step) alone; advances the step. The step
        stays on the device (`step_uniforms`): no sync."""
        out = step_uniforms(self.draw_seed, self.steps, n)
        self.steps += 1
        return out


class ReadCoverage(StatSums):
    """Counts bank reads found vs looked up (`READ_STATS`): the history (non-padding positions),
    short and long, and the targets read from the bank instead of encoded; a tracer leaf."""

    def __init__(self, short_len: int) -> None:
        super().__init__(READ_STATS)
        self.short_len = short_len

    @torch.no_grad()
    def forward(self, reads_missing: torch.Tensor, present: torch.Tensor, target_missing: torch.Tensor, target_read: torch.Tensor) -> None:
        found = present & ~reads_missing
        short = slice(-self.short_len, None)
        counts = [found[:, short].sum(), present[:, short].sum(), found.sum(), present.sum(), (target_read & ~target_missing).sum(), target_read.sum()]
        self.stats += torch.stack(counts).to(self.stats)


def known_mean(history: torch.Tensor, absent: torch.Tensor) -> torch.Tensor:
    """Mean of (N, L, 128) history representations over the positions not `absent` (N, L): the
    bank's missing reads and padding; zeros where none is known."""
    known = ~absent
    return (history * known.unsqueeze(-1)).sum(dim=1) / known.sum(dim=1, keepdim=True).clamp_min(1)


class InBatchContrastive(nn.Module):
    """InfoNCE between a user vector and the representation of each clicked target, the other
    clicked rows of the batch as negatives except rows of the same user (masked out)."""

    def __init__(self, user_dim: int, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.user_tower = nn.Sequential(nn.Linear(user_dim + OUTPUT_DIM, OUTPUT_DIM), nn.ReLU(), nn.Linear(OUTPUT_DIM, OUTPUT_DIM))

    def forward(
        self, user: torch.Tensor, pooled: torch.Tensor, target: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
        user_ids: torch.Tensor,
    ) -> torch.Tensor:
        """pooled (B, 128): each impression's history representations, `known_mean` of them."""
        clicked = ((labels > 0.5) & (weights > 0)).nonzero().squeeze(-1)
        users = F.normalize(self.user_tower(torch.cat([user, pooled], dim=-1)[clicked]), dim=-1)
        items = F.normalize(target[clicked], dim=-1)
        logits = self.scale * users @ items.T
        ids = user_ids[clicked]
        diagonal = torch.eye(len(clicked), dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill((ids.unsqueeze(0) == ids.unsqueeze(1)) & ~diagonal, float("-inf"))
        loss = F.cross_entropy(logits, torch.arange(len(clicked), device=logits.device), reduction="sum")
        return loss / max(len(clicked), 1)  # no clicked row: 0, with every parameter still in the graph


class CooccurrenceContrastive(StatSums):
    """InfoNCE between the two items of each co-occurrence pair (`muse_rec.data.cooccurrence`):
    anchor against every pair's positive, the other pairs of the same history masked out of the
    negatives (they may be its cluster-mates too). Sums its loss and pairs (`PAIR_STATS`) for
    metrics.jsonl."""

    def __init__(self, scale: float) -> None:
        super().__init__(PAIR_STATS)
        self.scale = scale

    def forward(self, values: torch.Tensor, history: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """values (P, 2, 128): anchor and positive representations (`TargetEncoding`), history (P,)
        the distinct history of each pair, negatives (P, N, 128) each anchor's hard negatives as
        the bank holds them (all zeros: none, or never written). Returns the mean loss (0 for
        P = 0, with the encoder still in the graph)."""
        if values.shape[0] == 0:
            loss = values.sum() * 0.0
        else:
            z = F.normalize(values, dim=-1)
            logits = self.scale * z[:, 0] @ z[:, 1].T
            diagonal = torch.eye(len(history), dtype=torch.bool, device=logits.device)
            logits = logits.masked_fill((history.unsqueeze(0) == history.unsqueeze(1)) & ~diagonal, float("-inf"))
            hard = self.scale * torch.einsum("pd,pnd->pn", z[:, 0], F.normalize(negatives, dim=-1))
            logits = torch.cat([logits, hard.masked_fill(missing(negatives), float("-inf"))], dim=1)
            loss = F.cross_entropy(logits, torch.arange(len(history), device=logits.device))
        self.stats += torch.stack([loss.detach().to(self.stats), self.stats.new_tensor(1.0), self.stats.new_tensor(float(len(history)))])
        return loss


class LemurModel(MuseModel):
    """`MuseModel`'s tables and dense arch, plus the content encoder, the bank table and the
    contrastive head. Same forward contract: `(loss, (loss, scores, labels, weights, user_ids))`.

    Beyond MUSE's tower input, the tower reads the target's representation (L2-normalised; the
    paper's encoded target joins the ranker's features, and it gives the ranking loss a direct
    path into the encoder), whether the target's bank read was missing, and the share of the
    long history missing from the bank: the "missing" flags; then (`sorted_similarities` = n > 0)
    the paper's cosine-similarity feature in sorted form: the n largest cosines between the target
    and the long history, which carry the ranking loss's gradient into the encoder (the GSU's
    selection and SimTier's histogram carry none); then (`history_attention`) the target's
    attention over the history's representations (`HistoryAttention`); then (`keep_scl`) the
    cosine feature as a SimTier histogram over the non-padding long history."""

    TOWER_EXTRA_INPUTS = OUTPUT_DIM + 2

    def __init__(self, config: ModelConfig, table_rows: dict[str, int], device: torch.device | None = None) -> None:
        super().__init__(config, table_rows, device)
        lemur = config.lemur
        if not 0.0 <= lemur.backward_share <= lemur.encode_share <= 1.0:
            raise ValueError(f"model.lemur: expected 0 <= backward_share <= encode_share <= 1, found {lemur.backward_share}, {lemur.encode_share}")
        simtier = SoftSimTier if lemur.soft_simtier else SimTier
        self.representation_simtier = simtier() if lemur.keep_scl else None
        extra = (self.TOWER_EXTRA_INPUTS if lemur.tower_reads_target else 2) + lemur.sorted_similarities
        self.history_attention = HistoryAttention(2 * config.embedding_dim) if lemur.history_attention else None
        extra += self.history_attention.out_features if self.history_attention is not None else 0
        extra += self.representation_simtier.bins if self.representation_simtier is not None else 0
        if extra != self.TOWER_EXTRA_INPUTS:
            self.dense = MuseDense(config, extra)
        if lemur.soft_simtier and not lemur.keep_scl:
            self.dense.simtier_short, self.dense.simtier_long = SoftSimTier(), SoftSimTier()
        self.bank_table = EmbeddingCollection([bank_table_config(table_rows[schema.ITEM_MAP], lemur.bank_dtype)], device=device)
        self.targets = TargetEncoding(lemur)
        self.read_coverage = ReadCoverage(config.short_seq_len)
        self.sorted_similarities = SortedSimilarities(lemur.sorted_similarities)
        user_dim = 3 * config.embedding_dim + 3 * config.embedding_dim // 2
        self.contrastive = InBatchContrastive(user_dim, lemur.contrastive_scale)
        self.cooccurrence = CooccurrenceContrastive(lemur.contrastive_scale)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        c = self.config.lemur
        target_scl, history_scl = self.scl_vectors(batch)
        rows = batch.sequence_features.to_dict()
        history_rows = batch.per_impression(rows[schema.HIST_ITEMS].values())
        target_rows = rows[schema.TARGET_ITEM].values()
        encoded_target, encoded, encodable, encoded_history, pairs = self.targets(
            target_rows, target_scl, batch.weights, history_rows, history_scl, batch.cooccurrence
        )
        bank = self.bank_table(batch.sequence_features)  # after the write: this step's targets are in
        bank_target = bank[schema.TARGET_ITEM].values().detach().float()
        bank_history = bank[schema.HIST_ITEMS].values().detach().float()  # (U x L, 128): each distinct history once
        if c.history_source == "bank":  # what depends on the history alone: once per distinct history
            keys = batch.per_impression(gsu.unit(bank_history), OUTPUT_DIM)
            distinct_absent = missing(bank_history).view(batch.num_histories, -1)
            absent = batch.per_impression(distinct_absent)
            pooled = known_mean(bank_history.view(batch.num_histories, -1, OUTPUT_DIM), distinct_absent)[batch.history_of_row]
        else:
            keys = gsu.unit(encoded_history)
            absent = missing(encoded_history)
            pooled = known_mean(encoded_history, absent)
        target_read = encodable & ~encoded
        self.read_coverage(absent, history_rows != 0, missing(bank_target), target_read)
        target = torch.where(encoded.unsqueeze(-1), encoded_target, bank_target)
        ranked = target if c.ranker_gradient else target.detach()  # false: the ranking loss leaves the encoder alone
        cosines = gsu.unit_cosines(ranked, keys)
        gsu_cosines = batch.top_cosines if c.keep_scl else cosines
        kept = self.kept_inputs(batch, self.retrieval.cosine_positions(gsu_cosines), gsu_cosines)  # the rows the loss reads alone
        extra = self._missing_flags_and_target(ranked, absent, history_rows)
        if not c.tower_reads_target:
            extra = extra[:, OUTPUT_DIM:]  # the missing flags alone
        if c.sorted_similarities:
            extra = torch.cat([extra, self.sorted_similarities(ranked, keys)], dim=-1)
        if self.history_attention is not None:
            extra = torch.cat([extra, self.history_attention(ranked, keys, (history_rows != 0) & ~absent)], dim=-1)
        if self.representation_simtier is not None:
            extra = torch.cat([extra, self.representation_simtier(cosines, history_rows != 0)], dim=-1)
        ranking, scores = two_class_loss_and_prob(self.dense(kept, extra), batch.labels, batch.weights)
        contrastive = self.contrastive(kept.user, pooled, target, batch.labels, batch.weights, batch.user_ids)
        loss = c.ranking_weight * ranking + c.contrastive_weight * contrastive
        if self.training and c.trains_on_pairs:
            places = batch.cooccurrence[:, 3:]
            negatives = bank_history[places.clamp_min(0)] * (places >= 0).unsqueeze(-1)
            loss = loss + c.cooccurrence_weight * self.cooccurrence(pairs, batch.cooccurrence[:, 2], negatives)
        return loss, (loss.detach(), scores.detach(), batch.labels, batch.weights, batch.user_ids)

    @staticmethod
    def _missing_flags_and_target(target: torch.Tensor, absent: torch.Tensor, history_rows: torch.Tensor) -> torch.Tensor:
        """(B, 128 + 2): normalised target, target missing, share of the non-padding history missing
        (`absent` (B, L): `missing` of the history's bank reads)."""
        present = history_rows != 0
        history_missing = (absent & present).sum(dim=1) / present.sum(dim=1).clamp_min(1)
        flags = torch.stack([missing(target).to(target.dtype), history_missing.to(target.dtype)], dim=-1)
        return torch.cat([F.normalize(target, dim=-1), flags], dim=-1)

    def pop_bank_stats(self) -> torch.Tensor:
        """`BankWriter.STATS` + `READ_STATS` + `PAIR_STATS` sums since the last call, this rank's share."""
        return torch.cat([self.targets.writer.pop_stats(), self.read_coverage.pop_stats(), self.cooccurrence.pop_stats()])


class SoftSimTier(SimTier):
    """SimTier with each cosine shared linearly between the two nearest bin centres instead of counted
    in its one bin: the same histogram up to that smoothing, but differentiable in the cosine, so the
    ranking loss reaches the encoder through the model's main similarity feature (`soft_simtier`).
    Bin b's centre is the middle of the hard bin's interval ((b - 10.5) / 10 with 22 bins)."""

    def forward(self, similarity: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        position = (similarity * float(self.steps_per_unit) + (self.steps_per_unit + 0.5)).clamp(0, self.bins - 1)
        lower = position.detach().floor().clamp(max=self.bins - 2)
        upper_share = position - lower
        increments = torch.ones_like(similarity) if mask is None else mask.to(similarity.dtype)
        counts = similarity.new_zeros(similarity.shape[0], self.bins)
        counts = counts.scatter_add(1, lower.long(), increments * (1 - upper_share)).scatter_add(1, lower.long() + 1, increments * upper_share)
        return torch.log(counts + 1.0) * self.weight


class SortedSimilarities(nn.Module):
    """(B, n): the n largest cosines between each target (B, 128) and its history (B, L, 128, given
    as `gsu.unit` of it), in descending order (a missing or padding item counts 0); the gradient
    goes to the target only.
    A module so that TorchRec's pipeline tracer keeps it whole (a leaf)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def forward(self, target: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        cosines = gsu.unit_cosines(target, keys.detach())
        return torch.topk(cosines, min(self.n, cosines.shape[1]), dim=1).values


class HistoryAttention(nn.Module):
    """The paper's sequence module over the history's representations: attention from the target's
    representation over every position of its long history as the bank holds it (no self-attention
    over the history), pooled and projected to `out_features` for the tower. The history is
    detached (bank reads), so the ranking loss reaches the encoder through the target's query.

    q = Wq t, k = Wk h, scores = q.k / sqrt(d) over the present positions, out = Wv sum softmax * h,
    with t and h L2-normalised. Scores are computed as h.(Wk^T q) and the value projection after
    the pooling (it commutes with the weighted sum): one (B, L, 128) product each way instead of
    projecting every history item; a key bias would add q.b to every score alike, so there is none."""

    def __init__(self, out_features: int, dim: int = OUTPUT_DIM) -> None:
        super().__init__()
        self.out_features = out_features
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, out_features)

    def forward(self, target: torch.Tensor, keys: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """target (B, 128), keys (B, L, 128) = `gsu.unit` of the history, present (B, L) bool ->
        (B, out_features); a history with nothing present pools to zeros (the value bias alone)."""
        probe = self.query(F.normalize(target, dim=-1)) @ self.key.weight / self.key.in_features ** 0.5
        items = keys.detach()
        return self.value(attention_pool(torch.einsum("bld,bd->bl", items, probe), items, present, eps=0.0))
