"""Class probabilities and label smoothing, as torch.nn.functional.cross_entropy
has them: the closed forms at lambda_v = lambda_t = 0, the reductions, mixed
dtypes, nan, and timm's Mixup / CutMix targets. The property tests of
test_fused_loss.py and test_cuda_schedules.py draw these targets too."""
import math

import pytest
import torch
import torch.nn.functional as F

import tesloss
from tesloss.reference import tes_loss as reference_tes_loss


def problem(b=12, c=37, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    vis = torch.randn(b, c, generator=gen, dtype=dtype) * 3
    txt = torch.rand(b, c, generator=gen, dtype=dtype) * 2 - 1
    labels = torch.randint(0, c, (b,), generator=gen)
    probs = torch.rand(b, c, generator=gen, dtype=dtype).softmax(1)
    return vis, txt, labels, probs


def loss_and_grads(loss_fn, vis, txt, target, **kwargs):
    vis, txt = (x.detach().clone().requires_grad_() for x in (vis, txt))
    loss = loss_fn(vis, txt, target, **kwargs)
    loss.sum().backward()
    return loss.detach(), vis.grad, txt.grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("form, ignore_index", [("index", -100), ("index", 3), ("probs", -100),
                                                 ("unnormalized", -100)])
def test_without_the_text_terms_it_is_cross_entropy(device, form, ignore_index, eps, reduction):
    vis, txt, labels, probs = problem()
    if form == "index":
        target = labels.clone()
        target[::4] = ignore_index
    else:
        target = probs * (torch.rand(len(probs), 1, dtype=probs.dtype) * 2 if
                          form == "unnormalized" else 1)
    vis, txt, target = vis.to(device), txt.to(device), target.to(device)
    loss, grad_vis, grad_txt = loss_and_grads(
        tesloss.fused_tes_loss, vis, txt, target, lambda_v=0.0, lambda_t=0.0,
        ignore_index=ignore_index, label_smoothing=eps, reduction=reduction)
    expected, expected_grad, _ = loss_and_grads(
        lambda z, t, y, **kw: F.cross_entropy(z, y, **kw), vis, txt, target,
        ignore_index=ignore_index, label_smoothing=eps, reduction=reduction)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_vis, expected_grad, rtol=1e-12, atol=1e-12)
    assert torch.equal(grad_txt, torch.zeros_like(grad_txt))


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_the_text_term_alone_is_cross_entropy_of_the_text_logits(device, eps):
    vis, txt, _, probs = problem()
    vis, txt, probs = vis.to(device), txt.to(device), probs.to(device)
    tau, lambda_t = 0.07, 0.4
    loss, _, grad_txt = loss_and_grads(tesloss.fused_tes_loss, vis, txt, probs, tau=tau,
                                       lambda_v=0.0, lambda_t=lambda_t, label_smoothing=eps)
    expected_vis = F.cross_entropy(vis, probs, label_smoothing=eps)
    t = txt.detach().clone().requires_grad_()
    expected_txt = F.cross_entropy(t / tau, probs, label_smoothing=eps)
    (lambda_t * expected_txt).backward()
    torch.testing.assert_close(loss, expected_vis + lambda_t * expected_txt, rtol=1e-12,
                               atol=1e-12)
    torch.testing.assert_close(grad_txt, t.grad, rtol=1e-12, atol=1e-12)


def test_onehot_probabilities_are_class_indices(device):
    vis, txt, labels, _ = problem()
    vis, txt, labels = vis.to(device), txt.to(device), labels.to(device)
    onehot = F.one_hot(labels, vis.shape[1]).to(vis.dtype)
    for eps in (0.0, 0.25):
        by_index = loss_and_grads(tesloss.fused_tes_loss, vis, txt, labels, label_smoothing=eps)
        by_probs = loss_and_grads(tesloss.fused_tes_loss, vis, txt, onehot, label_smoothing=eps)
        for a, b in zip(by_index, by_probs):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_mean_over_probability_rows_divides_by_the_batch(device):
    vis, txt, _, probs = problem()
    vis, txt, probs = vis.to(device), txt.to(device), probs.to(device)
    rows = tesloss.fused_tes_loss(vis, txt, probs, reduction="none")
    mean = tesloss.fused_tes_loss(vis, txt, probs, ignore_index=0)  # ignore_index does not apply
    torch.testing.assert_close(mean, rows.sum() / len(rows), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("target_dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_a_target_of_another_dtype_is_read_in_the_accumulation_type(device, target_dtype):
    vis, txt, _, probs = problem(dtype=torch.float32)
    vis, txt = vis.to(device), txt.to(device)
    target = probs.to(device, target_dtype)
    ours = loss_and_grads(tesloss.fused_tes_loss, vis, txt, target, label_smoothing=0.1)
    expected = loss_and_grads(tesloss.fused_tes_loss, vis, txt, target.float(),
                              label_smoothing=0.1)
    for a, b in zip(ours, expected):
        assert torch.equal(a, b)


def test_the_target_is_never_written(device):
    vis, txt, _, probs = problem()
    target = probs.to(device)
    before = target.clone()
    loss_and_grads(tesloss.fused_tes_loss, vis.to(device), txt.to(device), target,
                   label_smoothing=0.3)
    assert torch.equal(target, before)


def test_nan_in_a_target_reaches_that_rows_loss(device):
    vis, txt, _, probs = problem()
    probs[3, 5] = math.nan
    loss, grad_vis, grad_txt = loss_and_grads(tesloss.fused_tes_loss, vis.to(device),
                                              txt.to(device), probs.to(device),
                                              reduction="none")
    assert torch.isnan(loss[3]) and not torch.isnan(loss[torch.arange(12) != 3]).any()
    assert torch.isnan(grad_vis[3]).all() and torch.isnan(grad_txt[3]).all()


def test_a_zero_weight_adds_nothing_against_a_masked_class(device):
    # F.cross_entropy gives nan here (0 * -inf); a class index gives a finite loss.
    vis, txt, labels, _ = problem()
    vis[:, 0] = txt[:, 0] = -math.inf  # masked in both heads: p_ref is 0 there too
    labels = labels.clamp(min=1)
    onehot = F.one_hot(labels, vis.shape[1]).to(vis.dtype)
    by_probs = loss_and_grads(tesloss.fused_tes_loss, vis.to(device), txt.to(device),
                              onehot.to(device))
    by_index = loss_and_grads(tesloss.fused_tes_loss, vis.to(device), txt.to(device),
                              labels.to(device))
    assert torch.isfinite(by_probs[0]).all()
    for a, b in zip(by_probs, by_index):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_classes", [4, 40, 3000])
def test_a_tiny_weight_counts_in_a_row_with_a_masked_class(device, dtype, num_classes):
    # A weight of 1e-35 on a logit of -1e38 adds 1e3 to the loss. With a masked
    # class in the row, the forward takes its careful sum, which scaled the weight
    # by 2^-32 (to 2.3e-45, subnormal) before testing it for zero: the loss was
    # 1205.0 where the truth is 1000.8 (C = 4).
    vis = torch.zeros(2, num_classes, dtype=torch.float64)
    vis[:, 1], vis[:, 2], vis[:, -1] = -1e38, -math.inf, 1.0
    txt = torch.zeros(2, num_classes, dtype=torch.float64)
    probs = torch.zeros(2, num_classes, dtype=torch.float64)
    probs[:, 0], probs[:, 1], probs[:, -1] = 0.5, 1e-35, 0.5
    kwargs = dict(lambda_v=0.0, lambda_t=0.0, reduction="none")
    loss = tesloss.fused_tes_loss(vis.to(device, dtype), txt.to(device, dtype),
                                  probs.to(device, dtype), **kwargs)
    kept = torch.arange(num_classes) != 2  # the recipe gives nan: 0 * -inf
    truth = reference_tes_loss(vis.to(dtype).double()[:, kept], txt[:, kept],
                               probs.to(dtype).double()[:, kept], **kwargs)
    assert truth.min() > 1000
    torch.testing.assert_close(loss.cpu().double(), truth, rtol=1e-6, atol=0)


def test_negative_probabilities_are_taken_as_cross_entropy_takes_them(device):
    # Not a distribution, but F.cross_entropy takes them, and so does the op: a
    # row's loss may then be negative (the docstring says so).
    vis, txt, _, probs = problem()
    probs[torch.arange(12), vis.argmin(1)] = -1.0  # against each row's least likely class
    ours = tesloss.fused_tes_loss(vis.to(device), txt.to(device), probs.to(device),
                                  lambda_v=0.0, lambda_t=0.0, reduction="none")
    theirs = F.cross_entropy(vis, probs, reduction="none")
    torch.testing.assert_close(ours.cpu(), theirs, rtol=1e-12, atol=1e-12)
    assert (theirs < 0).any(), "some row's loss is negative"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_timm_mixup_targets(device, dtype):
    from timm.data import Mixup

    torch.manual_seed(0)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=100)
    images, labels = torch.rand(16, 3, 32, 32), torch.randint(0, 100, (16,))
    _, target = mixup(images, labels)
    assert target.shape == (16, 100) and target.dtype == torch.float32
    vis, txt, _, _ = problem(b=16, c=100)
    ours = loss_and_grads(tesloss.fused_tes_loss, vis.to(device, dtype), txt.to(device, dtype),
                          target.to(device))
    truth = loss_and_grads(reference_tes_loss, vis.to(dtype).double(), txt.to(dtype).double(),
                           target.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(ours, truth):
        torch.testing.assert_close(a.cpu().double(), b, rtol=tol, atol=tol)


def test_the_module_passes_label_smoothing_on(device):
    vis, txt, _, probs = problem()
    module = tesloss.TeSLoss(label_smoothing=0.2)
    assert "label_smoothing=0.2" in repr(module)
    args = (vis.to(device), txt.to(device), probs.to(device))
    assert torch.equal(module(*args), tesloss.fused_tes_loss(*args, label_smoothing=0.2))
