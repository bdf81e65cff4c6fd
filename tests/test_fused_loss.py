"""The fused op against the published recipe: values, both gradients, parts.

Hypothesis draws shapes (B in [0, 64], C in [1, 4096]), dtypes, tau, the
lambdas, reductions, ignored rows, row-strided and transposed layouts,
upstream gradients that are not 1, and extreme and very negative logits.
"""
import dataclasses
import math

import pytest
import torch
from conftest import (HALF_DTYPES, TOLERANCES, Case, assert_close, assert_matches_reference, run,
                      scales, tes_cases)
from hypothesis import given
from hypothesis import strategies as st

import tesloss
from tesloss.reference import tes_loss as reference_tes_loss


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@given(data=st.data())
def test_values_and_gradients_match_the_fp64_reference(dtype, data):
    case = data.draw(tes_cases(dtype))
    assert_matches_reference(case, dtype, run(tesloss.fused_tes_loss, case))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@given(data=st.data())
def test_half_types_err_at_most_twice_the_reference_in_that_dtype(dtype, data):
    case = data.draw(tes_cases(dtype))
    assert_matches_reference(case, dtype, run(tesloss.fused_tes_loss, case),
                             in_dtype=run(reference_tes_loss, case))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@given(data=st.data())
def test_parts_are_the_batch_means_of_the_reference_parts(dtype, data):
    case = data.draw(tes_cases(dtype, max_b=16, max_c=512))
    with torch.no_grad():
        _, parts = tesloss.fused_tes_loss(*case.leaves(), case.target, **case.kwargs,
                                          return_parts=True)
        _, ref = reference_tes_loss(*case.leaves(torch.float64), case.target, **case.kwargs,
                                    return_parts=True)
    as_mean = dataclasses.replace(case, kwargs={**case.kwargs, "reduction": "mean"},
                                  grad_out=torch.tensor(1.0, dtype=torch.float64))
    loss_scale = scales(as_mean)[0]
    for name in ("ce_vision", "kl_ref", "ce_text"):
        got = getattr(parts, name)
        assert not got.requires_grad
        assert_close(got, getattr(ref, name), TOLERANCES[dtype], loss_scale, f"parts.{name}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(reduction):
    vis = torch.randn(5, 7, requires_grad=True)
    txt = torch.randn(5, 7, requires_grad=True)
    target = torch.full((5,), -100)
    loss, parts = tesloss.fused_tes_loss(vis, txt, target, reduction=reduction,
                                         return_parts=True)
    expected = {"mean": torch.tensor(math.nan), "sum": torch.tensor(0.0),
                "none": torch.zeros(5)}[reduction]
    torch.testing.assert_close(loss.detach(), expected, equal_nan=True)
    assert all(torch.isnan(p) for p in parts), "means over zero rows are nan"
    loss.sum().backward()
    assert torch.equal(vis.grad, torch.zeros_like(vis)) or reduction == "mean"
    assert torch.equal(txt.grad, torch.zeros_like(txt)) or reduction == "mean"


def test_mean_over_all_ignored_rows_is_nan_like_cross_entropy():
    vis = torch.randn(3, 4)
    target = torch.full((3,), -100)
    ours = tesloss.fused_tes_loss(vis, torch.randn(3, 4), target, lambda_v=0.0, lambda_t=0.0)
    theirs = torch.nn.functional.cross_entropy(vis, target)
    assert torch.isnan(ours) and torch.isnan(theirs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(reduction):
    vis = torch.randn(0, 10, requires_grad=True)
    txt = torch.randn(0, 10, requires_grad=True)
    loss = tesloss.fused_tes_loss(vis, txt, torch.zeros(0, dtype=torch.long),
                                  reduction=reduction)
    ref = reference_tes_loss(vis.detach(), txt.detach(), torch.zeros(0, dtype=torch.long),
                             reduction=reduction)
    torch.testing.assert_close(loss.detach(), ref, equal_nan=True)
    loss.sum().backward()
    assert vis.grad.shape == (0, 10) and txt.grad.shape == (0, 10)


@pytest.mark.parametrize("column_from_end", [13, 1])  # in a whole vector; in the last, partial one
@pytest.mark.parametrize("num_classes", [33, 1000, 2500])
@pytest.mark.parametrize("where", ["vis", "txt"])
def test_nan_in_the_logits_reaches_the_loss_and_the_gradients(where, num_classes,
                                                              column_from_end):
    gen = torch.Generator().manual_seed(num_classes)
    vis = torch.randn(4, num_classes, generator=gen)
    txt = torch.rand(4, num_classes, generator=gen) * 2 - 1
    target = torch.tensor([1, 2, 3, 4])
    clean = Case(vis.clone(), txt.clone(), target, torch.ones(4, dtype=torch.float64),
                 dict(tau=0.03, lambda_v=0.1, lambda_t=0.3, ignore_index=-100,
                      reduction="none"))
    (vis if where == "vis" else txt)[2, num_classes - column_from_end] = math.nan
    assert torch.isnan(tesloss.fused_tes_loss(vis, txt, target))
    got = run_plain(tesloss.fused_tes_loss, vis, txt, target)
    expected = run_plain(reference_tes_loss, vis.double(), txt.double(), target)
    assert torch.isnan(got[0][2]) and torch.isfinite(got[0][[0, 1, 3]]).all()
    for name, g, e, scale in zip(("loss", "grad vis_logits", "grad txt_logits"), got, expected,
                                 scales(clean)):
        assert torch.equal(torch.isnan(g), torch.isnan(e)), f"{name}: nan where the reference has"
        assert_close(g, e, TOLERANCES[torch.float32], scale, name)  # nan matches nan there


def run_plain(loss_fn, vis, txt, target):
    vis, txt = vis.clone().requires_grad_(), txt.clone().requires_grad_()
    losses = loss_fn(vis, txt, target, reduction="none")
    losses.sum().backward()
    return losses.detach(), vis.grad, txt.grad


# fp32 takes the vector exp, which must give exp(-inf) = 0 with no nan on the way.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_masked_text_classes_give_a_finite_loss_and_kl(dtype):
    # -inf text logits (classes masked out of the reference) have p_ref = 0.
    vis, txt = torch.randn(4, 40, dtype=dtype), torch.randn(4, 40, dtype=dtype)
    txt[:, 30:] = -math.inf
    target = torch.tensor([0, 5, 29, 7])
    loss, parts = tesloss.fused_tes_loss(vis, txt, target, return_parts=True)
    ref = reference_tes_loss(vis.double(), txt.double(), target)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(loss.double(), ref, rtol=tol.rtol, atol=tol.atol)
    assert all(torch.isfinite(p) for p in parts)


def test_the_label_gradient_is_computed_before_rounding_to_bf16():
    # With a confident model p_v[y] ~ 1 and p_v[y] - 1 is tiny: rounding p_v
    # to bf16 first (Liger-Kernel #1329) would make the gradient 0.
    vis = torch.zeros(1, 8, dtype=torch.bfloat16)
    vis[0, 3] = 12.0
    vis.requires_grad_()
    txt = torch.zeros(1, 8, dtype=torch.bfloat16, requires_grad=True)
    tesloss.fused_tes_loss(vis, txt, torch.tensor([3]), lambda_v=0.0, lambda_t=0.0).backward()
    p_label = torch.softmax(vis.detach().double(), 1)[0, 3]
    expected = (p_label - 1).to(torch.bfloat16)
    assert vis.grad[0, 3] != 0
    assert vis.grad[0, 3] == expected


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("num_classes, masked_from", [(40, 30), (3000, 1024), (3000, 900)])
def test_classes_masked_in_both_logits_add_nothing(num_classes, masked_from, dtype):
    # -inf in both logits (a class left out) must weigh 0 in every sum, even
    # where a whole block of columns is masked.
    gen = torch.Generator().manual_seed(1)
    vis = torch.randn(5, num_classes, generator=gen, dtype=torch.float64).to(dtype)
    txt = (torch.rand(5, num_classes, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)
    target = torch.randint(0, masked_from, (5,), generator=gen)
    vis[:, masked_from:] = -math.inf
    txt[:, masked_from:] = -math.inf
    vis.requires_grad_()
    txt.requires_grad_()
    loss = tesloss.fused_tes_loss(vis, txt, target, reduction="none")
    loss.sum().backward()
    kept = [x.detach()[:, :masked_from].double().requires_grad_() for x in (vis, txt)]
    expected = reference_tes_loss(*kept, target, reduction="none")
    expected.sum().backward()
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(loss.double(), expected, rtol=tol.rtol, atol=tol.atol)
    for full, part in zip((vis, txt), kept):
        torch.testing.assert_close(full.grad[:, :masked_from].double(), part.grad,
                                   rtol=tol.rtol, atol=tol.atol)
        assert torch.equal(full.grad[:, masked_from:], torch.zeros_like(full.grad[:, masked_from:]))
