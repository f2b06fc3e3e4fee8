"""The LEMUR content encoder: a small bidirectional Transformer, CLS-pooled to a 128-d item vector.

Input is either an item's title tokens (`content_input: tokens`) or, for TAOBAO-MM which ships no
text, its frozen 128-d SCL vector cut into `scl_chunks` tokens (`content_input: scl`). A learned
[CLS] vector is prepended, learned positions are added, padding tokens (id 0) are masked out of
attention, and the [CLS] output goes through LayerNorm and a linear map to 128 dimensions, then
(`centre_output`) loses the mean representation (`OutputCentring`).
"""
from __future__ import annotations

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
    """Subtracts the mean representation: the batch's while training, a running mean otherwise (and
    for a batch of one). The [CLS] output of every item shares a large common part ([CLS] and
    position vectors, biases), and any loss can lower itself by growing it: every item then points
    one way and cosine retrieval has nothing left (benchmarks/lemur.py measured cosine 1.000 within
    and across clusters). Through the batch mean the gradient has no common part, so nothing grows it."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(OUTPUT_DIM))

    def reset_parameters(self) -> None:
        self.running_mean.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.shape[0] < 2:
            return x - self.running_mean
        mean = x.mean(dim=0)
        with torch.no_grad():
            self.running_mean.lerp_(mean.detach(), CENTRING_MOMENTUM)
        return x - mean


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

    def forward(self, content: torch.Tensor) -> torch.Tensor:
        """content: (N, max_tokens) int token IDs, or (N, 128) float SCL vectors. Returns (N, 128)."""
        if content.shape[0] == 0:  # no item this step: still a graph through every parameter (zero
            # gradients), so DDP sees the same parameters used on every rank
            return sum(p.sum() for p in self.parameters()) * 0.0 + self.out.bias.new_zeros(0, OUTPUT_DIM)
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
        return self.centring(self.out(self.norm(x[:, 0])))
