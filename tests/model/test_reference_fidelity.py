"""MuseDense against golden numbers of the official MUSE code (shared/fixtures/reference-muse).

The fixture holds the reference's initial dense weights, random inputs (pads, items without an
SCL vector, a 30-item history in row 0), and what the reference computed from them in train
mode: the GSU's K positions, the loss, the clipped probabilities and every gradient. We load the
weights into `MuseDense` by the explicit name table below, feed the same inputs as a
`DenseInputs`, and compare, for muse, sim_soft, sim_hard and din.

Tolerances. The float32 rounding error of the reference itself, measured against a float64
evaluation of the same model, is at most ~8e-8 on the loss and the probabilities (about one ulp
at 0.5-0.7) and at most 2e-5 of a gradient tensor's largest entry, except for three SA-TA
tensors (`REDUCTION_DOMINATED`) whose gradient sums the softmax gradient over the K slots,
which sums to zero, so that it keeps mostly rounding: up to 5.5e-3 of their largest entry.
muse_rec's own float32 error is of the same size, so each bound below sits about 10x or more
above the measured deviation (other CPU kernels, AVX-512 or AMX, sum in other orders) and far
below what a semantic change moves: every bug injected when this test was written (Dice's alpha
on the wrong branch, a SimTier bin lost or shifted, sim_hard's oldest matches, no 0.0 -> -1.1,
unzeroed sim_hard slots, pads left out of a mean, no SiLU on the SA-TA values) moved some
gradient by 3% or more of its tensor's largest entry, and most the loss by 1e-5 or more.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

from muse_rec.config import ModelConfig, load_config
from muse_rec.model import gsu
from muse_rec.model.muse import DenseInputs, FullInputs, MuseDense, select
from muse_rec.model.tower import two_class_loss_and_prob

FIXTURE_DIR = Path(
    os.environ.get(
        "MUSE_REC_REFERENCE_DIR", Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "reference-muse"
    )
)
"""Beside the checkout, like the demo tables of tests/conftest.py, or where MUSE_REC_REFERENCE_DIR says."""

METHODS = ("muse", "sim_soft", "sim_hard", "din")
K = 50

REFERENCE_TO_MUSE_REC = {
    # The Dice tower: Linear i is tower.layers.2i, its Dice tower.layers.2i+1; dice_gamma (1, n) is Dice's alpha (n,).
    "fc_tower.linears.0.weight": "tower.layers.0.weight",
    "fc_tower.linears.0.bias": "tower.layers.0.bias",
    "fc_tower.act_layers.0.dice_gamma": "tower.layers.1.alpha",
    "fc_tower.linears.1.weight": "tower.layers.2.weight",
    "fc_tower.linears.1.bias": "tower.layers.2.bias",
    "fc_tower.act_layers.1.dice_gamma": "tower.layers.3.alpha",
    "fc_tower.linears.2.weight": "tower.layers.4.weight",
    "fc_tower.linears.2.bias": "tower.layers.4.bias",
    "fc_tower.act_layers.2.dice_gamma": "tower.layers.5.alpha",
    "fc_tower.linears.3.weight": "tower.layers.6.weight",
    "fc_tower.linears.3.bias": "tower.layers.6.bias",
    "fc_tower.act_layers.3.dice_gamma": "tower.layers.7.alpha",
    # Target attention over the last 50: query and key ("fact") projections.
    "realtime_att.query_fcs.0.linears.0.weight": "short_attention.query.weight",
    "realtime_att.query_fcs.0.linears.0.bias": "short_attention.query.bias",
    "realtime_att.fact_fcs.0.linears.0.weight": "short_attention.key.weight",
    "realtime_att.fact_fcs.0.linears.0.bias": "short_attention.key.bias",
    # SA-TA over the top-K; cosine_tau1 (2, 1) is tau (2,), cosine_tau2 (3, 1) the gates g1..g3 (3,).
    "uni_att_v2.query_layers.0.linears.0.weight": "long_attention.query.weight",
    "uni_att_v2.query_layers.0.linears.0.bias": "long_attention.query.bias",
    "uni_att_v2.fact_layers.0.linears.0.weight": "long_attention.key.weight",
    "uni_att_v2.fact_layers.0.linears.0.bias": "long_attention.key.bias",
    "uni_att_v2.value_layers.0.linears.0.weight": "long_attention.value.weight",
    "uni_att_v2.value_layers.0.linears.0.bias": "long_attention.value.bias",
    "uni_att_v2.cosine_tau1": "long_attention.tau",
    "uni_att_v2.cosine_tau2": "long_attention.gates",
    # SimTier weights (1, 22, 1) -> (22,): rt = the short sequence, uni_v2 = the top-K.
    "all_seq_image_res.rt_simtier.emb": "simtier_short.weight",
    "all_seq_image_res.uni_v2_simtier.emb": "simtier_long.weight",
}

EMBEDDING_INPUTS = (
    "items", "cates", "target_item", "target_cate", "a213", "a214",
    "u129_1", "u130_1", "u130_2", "u130_3", "u130_4", "u130_5",
)  # fmt: skip
"""The fixture's looked-up embeddings: leaves of the graph, so their `.grad` is the input gradient."""
SEQUENCE_INPUTS = ("items", "cates")
"""Compared only where `in/present`: pad positions map to table row 0, never updated, and which
pads fill row 0's top-K is the reference kernel's choice (fixture README)."""

LOSS_ATOL = PROB_ATOL = 1e-6
"""~16 float32 ulps at 0.5-0.7; both sides measured within 1 ulp of each other."""
GRAD_RTOL = 1e-3
"""Of the tensor's largest reference entry; measured up to 3e-5 with torch's AVX-512, AVX2 and
default CPU kernels (the reference's own error vs float64: up to 2e-5)."""
REDUCTION_DOMINATED_RTOL = 5e-2
REDUCTION_DOMINATED = ("long_attention.tau", "long_attention.gates", "long_attention.key.bias")
"""Gradients that sum the SA-TA softmax gradient (zero sum over K) times a nearly constant factor
(the cosine amplified by 1/tau^2 = 100, the score terms, the key bias' unit Jacobian): what is
left is mostly cancellation, so float32 rounding is up to 5.5e-3 of the result (reference vs
float64: tau 5.5e-3, gates 3e-3, key bias 1.9e-4)."""


def dense_inputs(arrays: dict[str, torch.Tensor], config: ModelConfig) -> DenseInputs:
    """The fixture's `in/*` arrays (keys without the prefix) as muse_rec's dense input: the whole
    sequence, through `select`, the GSU muse_rec runs on whole sequences (the loader's GSU is held
    to it by tests/data/test_gsu.py and test_loader.py).

    SCL vectors enter as their raw int8 values cast to float, as in the reference (cosines are
    scale invariant, so muse_rec's /127 dequantisation is the same), and their cosines as both GSU
    stages compute them (`gsu.scl_cosines`). The category IDs stand in for the category-table rows
    sim_hard compares.
    """
    full = FullInputs(
        user=torch.cat([arrays[name] for name in ("u129_1", "u130_1", "u130_2", "u130_3", "u130_4", "u130_5")], dim=-1),
        ad_attributes=torch.cat([arrays["a213"], arrays["a214"]], dim=-1),
        target_item=arrays["target_item"],
        target_cate=arrays["target_cate"],
        items=arrays["items"],
        cates=arrays["cates"],
        cosines=gsu.scl_cosines(arrays["target_scl"].float(), arrays["scl"].float()),
        cate_rows=arrays["cate_ids"],
        target_cate_row=arrays["target_cate_id"],
        present=arrays["present"],
    )
    return select(full, config)


class Run(NamedTuple):
    reference: dict[str, torch.Tensor]  # the fixture, every array by its name
    model: MuseDense  # after one backward
    inputs: dict[str, torch.Tensor]  # the embedding leaves, with .grad
    loss: torch.Tensor
    score: torch.Tensor  # prob[:, 1]
    top_k_sequences: list[torch.Tensor]  # what SA-TA received as its top-K sequence (B, K, 2D), per call


def load_reference_weights(model: MuseDense, reference: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(state) == set(REFERENCE_TO_MUSE_REC.values()), "every dense tensor must have a reference name"
    with torch.no_grad():
        for name, ours in REFERENCE_TO_MUSE_REC.items():
            state[ours].copy_(reference[f"param/{name}"].reshape(state[ours].shape))


def record_top_k_sequences(model: MuseDense) -> list[torch.Tensor]:
    """Records the top-K sequence each SA-TA call receives: the GSU's choice as the ESU sees it."""
    recorded: list[torch.Tensor] = []
    signature = inspect.signature(model.long_attention.forward)

    def hook(module, args, kwargs):
        recorded.append(signature.bind(*args, **kwargs).arguments["sequence"].detach())

    model.long_attention.register_forward_pre_hook(hook, with_kwargs=True)
    return recorded


@pytest.fixture(scope="module", params=METHODS)
def run(request: pytest.FixtureRequest) -> Run:
    method = request.param
    path = FIXTURE_DIR / f"{method}.npz"
    if not path.is_file():
        pytest.fail(f"the reference fixture is expected at {path} (shared/ beside the checkout, or set MUSE_REC_REFERENCE_DIR)")
    with np.load(path) as arrays:
        reference = {name: torch.from_numpy(arrays[name]) for name in arrays.files}
    config = load_config(
        None,
        [
            f"model.method={method}",
            "model.embedding_dim=16",
            f"model.keep_top={K}",
            "model.short_seq_len=50",
            "data.long_seq_len=1000",
        ],
    ).model
    model = MuseDense(config)
    load_reference_weights(model, reference)
    model.train()
    top_k_sequences = record_top_k_sequences(model)
    inputs = {name: reference[f"in/{name}"].clone().requires_grad_(True) for name in EMBEDDING_INPUTS}
    arrays = {name[3:]: value for name, value in reference.items() if name.startswith("in/")}
    logits = model(dense_inputs({**arrays, **inputs}, config))
    labels = reference["in/label"][:, 1]  # one-hot [no click, click]
    loss, score = two_class_loss_and_prob(logits, labels, torch.ones_like(labels))
    loss.backward()
    return Run(reference, model, inputs, loss.detach(), score.detach(), top_k_sequences)


def assert_close_to_reference(ours: torch.Tensor, theirs: torch.Tensor, rtol: float, what: str) -> None:
    """max |ours - theirs| <= rtol * max |theirs|: a bound on the tensor's scale, not per entry."""
    deviation = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    assert scale > 0, f"{what}: the reference gradient is all zero"
    assert deviation <= rtol * scale, f"{what}: max deviation {deviation:.3g} > {rtol:g} x max {scale:.3g}"


def positions_of(top: torch.Tensor, sequence: torch.Tensor) -> list[list[int]]:
    """Per row, the sorted sequence positions whose (item, category) embedding fills a slot of
    `top`; zero slots (pads, sim_hard's zeroed slots) are left out. Real behaviours have distinct
    random embeddings, so each non-zero slot matches exactly one position."""
    matches = (top.unsqueeze(2) == sequence.unsqueeze(1)).all(dim=-1)  # (B, K, L)
    filled = top.ne(0).any(dim=-1)
    assert (matches.sum(dim=-1)[filled] == 1).all()
    return [sorted(row_matches[row_filled].nonzero()[:, 1].tolist()) for row_matches, row_filled in zip(matches, filled)]


def test_gsu_selects_the_reference_positions(run: Run):
    """Sets per row (order within the top-K is irrelevant to the ESU); pads excluded: row 0 has 30
    behaviours, so 20 of its K slots hold pads, and which ones is the reference kernel's choice.
    sim_hard: only the slots `top_k_valid` marks (category matches); the others read as zeros."""
    method = run.model.config.method
    if method == "din":
        assert run.top_k_sequences == []  # no long branch: its features are zeros
        return
    (top,) = run.top_k_sequences
    ref = run.reference
    sequence = torch.cat([ref["in/items"], ref["in/cates"]], dim=-1)
    chosen = ref["out/top_k"]
    kept = torch.take_along_dim(ref["in/present"], chosen, dim=1)
    if method == "sim_hard":
        kept &= ref["out/top_k_valid"]
    expected = [sorted(row[row_kept].tolist()) for row, row_kept in zip(chosen, kept)]
    assert positions_of(top, sequence) == expected


def test_loss_and_probability(run: Run):
    """The reference's `prop` is clip(softmax + 1e-7, 0, 1) (its rows sum to 1 + 2e-7), as muse_rec's."""
    torch.testing.assert_close(run.loss, run.reference["out/loss"][0], rtol=0, atol=LOSS_ATOL)
    torch.testing.assert_close(run.score, run.reference["out/prop"][:, 1], rtol=0, atol=PROB_ATOL)


def test_dense_gradients(run: Run):
    """Every dense parameter; din's long branch has no reference gradient and must get none here."""
    parameters = dict(run.model.named_parameters())
    for name, ours in REFERENCE_TO_MUSE_REC.items():
        grad = parameters[ours].grad
        if f"grad/{name}" not in run.reference:
            assert grad is None or not grad.any(), f"{ours}: a gradient where the reference has none"
            continue
        assert grad is not None, f"{ours}: no gradient"
        rtol = REDUCTION_DOMINATED_RTOL if ours in REDUCTION_DOMINATED else GRAD_RTOL
        assert_close_to_reference(grad, run.reference[f"grad/{name}"].reshape(grad.shape), rtol, ours)


def test_input_embedding_gradients(run: Run):
    present = run.reference["in/present"]
    for name, leaf in run.inputs.items():
        ours, theirs = leaf.grad, run.reference[f"grad_in/{name}"]
        if name in SEQUENCE_INPUTS:
            ours, theirs = ours[present], theirs[present]
        assert_close_to_reference(ours, theirs, GRAD_RTOL, f"input {name}")
