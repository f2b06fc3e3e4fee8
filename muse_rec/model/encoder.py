"""The LEMUR content encoder: a small bidirectional Transformer, CLS-pooled to a 128-d item vector.

Input is either an item's title tokens (`content_input: tokens`) or, for TAOBAO-MM which ships no
text, its frozen 128-d SCL vector cut into `scl_chunks` tokens (`content_input: scl`). A learned
[CLS] vector is prepended, learned positions are added, padding tokens (id 0) are masked out of
attention, and the [CLS] output goes through LayerNorm and a linear map to 128 dimensions, then
(`centre_output`) loses the mean representation (`OutputCentring`).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from muse_rec import schema
from muse_rec.config import LemurConfig

OUTPUT_DIM = schema.SCL_DIM
"""The representation replaces the SCL vector in the GSU and ESU, so it has its width."""
INIT_STD = 0.02
"""Token, [CLS] and position embeddings start as N(0, 0.02), as BERT's do (not nn.Embedding's N(0, 1))."""
CENTRING_MOMENTUM = 0.1
"""Weight of each training batch's mean in the running mean (BatchNorm's default)."""


class OutputCentring(nn.Module):
    """Subtracts the mean representation. The [CLS] output of every item shares a large common part
    ([CLS] and position vectors, biases), and any loss can lower itself by growing it: every item
    then points one way and cosine retrieval has nothing left (benchmarks/lemur.py measured cosine
    1.000 within and across clusters). Training centres the gradient by the batch mean, which has
    no common part, so nothing grows it. Evaluation, and every value written to the memory bank,
    are centred by the running mean instead, so cached items and evaluated targets share one
    reference: `last_shift` (batch mean - running mean of the last training call) turns a training
    value into that (lemur's `TargetEncoding` adds it to the targets it writes).

    `deferred` (set by lemur's `TargetEncoding`): the running mean moves once a training step, in
    `commit`, by the mean over every item this step encoded on any rank; so it is the same on every
    rank (one reference for the whole bank, and a checkpoint holds the state of every rank). Else
    each training batch moves it at once."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(OUTPUT_DIM))
        self.register_buffer("batches_tracked", torch.zeros(()))  # updates the running mean has had
        self.deferred = False
        self._pending: list[tuple[torch.Tensor, int]] = []  # (sum, count) of this step's training batches
        self.last_shift = torch.zeros(OUTPUT_DIM)

    def reset_parameters(self) -> None:
        self.running_mean.zero_()
        self.batches_tracked.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_shift = self.running_mean.new_zeros(OUTPUT_DIM)
        if not self.training or x.shape[0] < 2:
            return x - self.running_mean
        mean = x.mean(dim=0)
        reference = torch.where(self.batches_tracked > 0, self.running_mean, mean.detach())  # before any update: the batch's
        self.last_shift = mean.detach() - reference
        if self.deferred:
            self._pending.append((x.detach().sum(dim=0), x.shape[0]))
        else:
            self._update(mean.detach())
        return x - mean

    @torch.no_grad()
    def commit(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Deferred mode, once a training step on every rank: the running mean takes the mean of this
        step's encoded items summed over ranks by `reduce` (an all-reduce); no host read."""
        total = self.running_mean.new_zeros(OUTPUT_DIM + 1)
        for values, count in self._pending:
            total[:-1] += values
            total[-1] += count
        self._pending.clear()
        total = reduce(total)
        self._update(total[:-1] / total[-1].clamp_min(1), total[-1] > 0)

    def _update(self, mean: torch.Tensor, seen: torch.Tensor | bool = True) -> None:
        """The first update sets the running mean, later ones move it by CENTRING_MOMENTUM."""
        with torch.no_grad():
            moved = torch.where(self.batches_tracked > 0, self.running_mean.lerp(mean, CENTRING_MOMENTUM), mean)
            self.running_mean.copy_(torch.where(torch.as_tensor(seen, device=mean.device), moved, self.running_mean))
            self.batches_tracked += torch.as_tensor(seen, device=mean.device).to(self.batches_tracked.dtype)

    @torch.no_grad()
    def frozen(self, x: torch.Tensor) -> torch.Tensor:
        """Centring for values written to the bank without gradient (warm start, refresh): the running
        mean, or before any training batch (a fresh encoder) the mean of `x` itself; updates nothing.
        No device sync: both are computed and one is chosen on the device."""
        own = x.mean(dim=0) if x.shape[0] else self.running_mean
        return x - torch.where(self.batches_tracked > 0, self.running_mean, own)


class ContentEncoder(nn.Module):
    def __init__(self, config: LemurConfig) -> None:
        super().__init__()
        if config.width % config.heads:
            raise ValueError(f"model.lemur.width ({config.width}) must be a multiple of model.lemur.heads ({config.heads})")
        self.content_input = config.content_input
        if config.content_input == "tokens":
            self.embed = nn.Embedding(config.vocab_size, config.width, padding_idx=schema.PAD_TOKEN)
            positions = config.max_tokens
        else:
            if OUTPUT_DIM % config.scl_chunks:
                raise ValueError(f"model.lemur.scl_chunks ({config.scl_chunks}) must divide {OUTPUT_DIM}")
            self.chunk = OUTPUT_DIM // config.scl_chunks
            self.embed = nn.Linear(self.chunk, config.width)
            positions = config.scl_chunks
        self.cls = nn.Parameter(torch.empty(config.width))
        self.positions = nn.Parameter(torch.empty(positions + 1, config.width))
        layer = nn.TransformerEncoderLayer(
            config.width, config.heads, 4 * config.width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.width)
        self.out = nn.Linear(config.width, OUTPUT_DIM)
        self.centring = OutputCentring() if config.centre_output else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every parameter of the subtree, MultiheadAttention's included (it has no public
        `reset_parameters`, so DMP's meta-device materialisation would leave it uninitialised)."""
        for module in self.modules():
            if module is self:
                continue
            for name in ("reset_parameters", "_reset_parameters"):
                if hasattr(module, name):
                    getattr(module, name)()
                    break
        nn.init.normal_(self.cls, std=INIT_STD)
        nn.init.normal_(self.positions, std=INIT_STD)
        if isinstance(self.embed, nn.Embedding):  # BERT's scale: AdamW's steps of about lr move tokens from the start
            nn.init.normal_(self.embed.weight, std=INIT_STD)
            with torch.no_grad():
                self.embed.weight[schema.PAD_TOKEN].zero_()

    @torch.no_grad()
    def calibrate_centring(self, content: torch.Tensor) -> bool:
        """An encoder whose running mean has seen no training batch yet (a fresh one, trained or frozen)
        takes the mean output of these items as its running mean (the warm start, before the first
        step, on the same items on every rank), so that every value it writes, and a frozen one's
        every output, is centred alike; True if it did."""
        centring = self.centring
        if not isinstance(centring, OutputCentring) or bool(centring.batches_tracked > 0) or not content.shape[0]:
            return False
        centring.running_mean.copy_(self._raw(content).mean(dim=0))
        centring.batches_tracked.fill_(1)
        return True

    @torch.no_grad()
    def encode_for_bank(self, content: torch.Tensor) -> torch.Tensor:
        """(N, 128) values to store in the bank, without gradient and without changing any state: a
        frozen encoder (eval mode) as in evaluation; a training one centred as `OutputCentring.frozen`
        says, so a warm start before the first step is centred like the targets of that step."""
        if not self.training or not isinstance(self.centring, OutputCentring):
            return self(content)
        return self.centring.frozen(self._raw(content))

    def forward(self, content: torch.Tensor) -> torch.Tensor:
        """content: (N, max_tokens) int token IDs, or (N, 128) float SCL vectors. Returns (N, 128)."""
        if content.shape[0] == 0:  # no item this step: still a graph through every parameter (zero
            # gradients), so DDP sees the same parameters used on every rank
            return sum(p.sum() for p in self.parameters()) * 0.0 + self.out.bias.new_zeros(0, OUTPUT_DIM)
        return self.centring(self._raw(content))

    def _raw(self, content: torch.Tensor) -> torch.Tensor:
        """The [CLS] output before centring, (N, 128)."""
        if content.shape[0] == 0:
            return self.out.bias.new_zeros(0, OUTPUT_DIM)
        if self.content_input == "tokens":
            tokens = content.long()
            x = self.embed(tokens)
            padding = tokens == schema.PAD_TOKEN
        else:
            x = self.embed(content.float().view(content.shape[0], -1, self.chunk))
            padding = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        x = torch.cat([self.cls.expand(x.shape[0], 1, -1), x], dim=1) + self.positions[: x.shape[1] + 1]
        padding = torch.cat([padding.new_zeros(padding.shape[0], 1), padding], dim=1)  # [CLS] always attends
        x = self.layers(x, src_key_padding_mask=padding)
        return self.out(self.norm(x[:, 0]))
