"""Liger-Kernel's own accuracy bars, held where torch meets them: the shapes and
tolerances of its KL-divergence and cross-entropy tests, against a float64 truth.
Wherever torch in that dtype (softmax and F.cross_entropy) is within the tolerance,
element by element, tesloss must be too. Written from the grids' shapes and
tolerances, not from Liger-Kernel's code.

The KL grid is TeS at tau = 1, lambda_v = 1, lambda_t = 0: the loss is then
CE(z, softmax(t)) = KL(softmax(t) || softmax(z)) + H(softmax(t)), and with z a row of
log-probabilities, as Liger's inputs are, its gradient is exp(z) - softmax(t). The
CE grid is lambda_v = lambda_t = 0: F.cross_entropy itself.

Scaled for the CPU: each case keeps the grid's class count but takes only as many of
its B * T rows as make ELEMENTS logits. Rows are independent, and an element's
accuracy does not depend on how many there are; with "mean" the elements grow by the
ratio of rows, which makes the absolute tolerance stricter, not looser.
TESLOSS_FULL_PEER_GRIDS=1 runs every row.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import tesloss
from tesloss.reference import tes_loss as reference_tes_loss
from tesloss.testing import errors

ELEMENTS = None if os.environ.get("TESLOSS_FULL_PEER_GRIDS") else 2**22

# (dtype, atol, rtol): Liger-Kernel's tolerances for each test.
KL_TOLERANCES = [(torch.float32, 1e-8, 1e-6), (torch.bfloat16, 1e-8, 5e-2),
                 (torch.float16, 1e-3, 1e-3)]
CE_TOLERANCES = [(torch.float32, 1e-8, 1e-6), (torch.bfloat16, 1e-8, 5e-2)]
# (B, T, V)
KL_SHAPES = [(1, 4096, 32000), (32, 4096, 1024), (41, 401, 1271), (3, 423, 32000),
             (1, 4096, 128256)]
CE_SHAPES = [(2, 4096, 32000), (3, 423, 32000)]
# F.cross_entropy's keywords in the CE grid's variants: plain, with ignored rows,
# with label smoothing, with both.
CE_VARIANTS = {
    "plain": dict(),
    "ignore_index 2": dict(ignore_index=2),
    "ignore_index -123": dict(ignore_index=-123),
    "label_smoothing 0.1": dict(label_smoothing=0.1),
    "ignore_index 1, label_smoothing 0.1": dict(ignore_index=1, label_smoothing=0.1),
    "ignore_index -300, label_smoothing 0.2": dict(ignore_index=-300, label_smoothing=0.2),
}


def rows(batch, time, classes):
    return batch * time if ELEMENTS is None else min(batch * time, max(2, ELEMENTS // classes))


def loss_and_grad(loss_fn, vis, *args, dtype, reduction, **kwargs):
    """The loss and the gradient of vis in `dtype`, upstream gradient 1 (per row for
    "none")."""
    vis = vis.detach().to(dtype).clone().requires_grad_()
    loss = loss_fn(vis, *args, reduction=reduction, **kwargs)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), vis.grad


def worst(actual, truth, atol, rtol):
    """The largest |actual - truth| / (atol + rtol |truth|): at most 1 within tolerance."""
    return (errors(actual, truth) / (atol + rtol * truth.abs())).max().item()


def assert_within_where_torch_is(ours, torch_ones, truth, atol, rtol):
    for name, a, t, e in zip(("loss", "gradient"), ours, torch_ones, truth):
        torch_worst, our_worst = worst(t, e, atol, rtol), worst(a, e, atol, rtol)
        assert our_worst <= 1 or torch_worst > 1, (
            f"{name}: tesloss errs {our_worst:.3g} x the tolerance (atol {atol}, rtol {rtol}), "
            f"torch {torch_worst:.3g} x")


@pytest.mark.parametrize("dtype, atol, rtol", KL_TOLERANCES)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("shape", KL_SHAPES)
def test_liger_kl_grid(device, shape, reduction, dtype, atol, rtol):
    gen = torch.Generator().manual_seed(0)
    n, classes = rows(*shape), shape[2]
    vis = torch.randn(n, classes, generator=gen).to(dtype).log_softmax(-1)
    txt = torch.randn(n, classes, generator=gen).to(dtype)
    labels = torch.zeros(n, dtype=torch.long)  # weighs nothing at lambda_v = 1, lambda_t = 0
    recipe = dict(tau=1.0, lambda_v=1.0, lambda_t=0.0)
    truth = loss_and_grad(reference_tes_loss, vis.double(), txt.double(), labels,
                          dtype=torch.float64, reduction=reduction, **recipe)
    torch_ones = loss_and_grad(F.cross_entropy, vis, txt.softmax(-1), dtype=dtype,
                               reduction=reduction)
    ours = loss_and_grad(tesloss.fused_tes_loss, vis.to(device), txt.to(device),
                         labels.to(device), dtype=dtype, reduction=reduction, **recipe)
    assert_within_where_torch_is([x.cpu() for x in ours], torch_ones, truth, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", CE_TOLERANCES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("variant", CE_VARIANTS)
@pytest.mark.parametrize("shape", CE_SHAPES)
def test_liger_cross_entropy_grid(device, shape, variant, reduction, dtype, atol, rtol):
    gen = torch.Generator().manual_seed(1)
    n, classes = rows(*shape), shape[2]
    kwargs = CE_VARIANTS[variant]
    vis = torch.randn(n, classes, generator=gen).to(dtype)
    labels = torch.randint(0, classes, (n,), generator=gen)
    if "ignore_index" in kwargs:  # a random number of rows, up to half, ignored
        ignored = torch.randperm(n, generator=gen)[:int(torch.randint(1, n // 2, (1,),
                                                                      generator=gen))]
        labels[ignored] = kwargs["ignore_index"]
    truth = loss_and_grad(F.cross_entropy, vis.double(), labels, dtype=torch.float64,
                          reduction=reduction, **kwargs)
    torch_ones = loss_and_grad(F.cross_entropy, vis, labels, dtype=dtype, reduction=reduction,
                               **kwargs)
    ours = loss_and_grad(tesloss.fused_tes_loss, vis.to(device), torch.zeros_like(vis).to(device),
                         labels.to(device), dtype=dtype, reduction=reduction, lambda_v=0.0,
                         lambda_t=0.0, **kwargs)
    assert_within_where_torch_is([x.cpu() for x in ours], torch_ones, truth, atol, rtol)
