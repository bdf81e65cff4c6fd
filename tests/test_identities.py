"""Special cases of the TeS loss that have closed forms (those of class
probabilities and label smoothing, cross-entropy among them, are test_targets.py's)."""
import pytest
import torch
from torch import nn

import tesloss
from tesloss import testing


def logits(device, b=12, c=37, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    vis = torch.randn(b, c, generator=gen, dtype=dtype) * 3
    txt = torch.rand(b, c, generator=gen, dtype=dtype) * 2 - 1
    target = torch.randint(0, c, (b,), generator=gen)
    return (vis.to(device).requires_grad_(), txt.to(device).requires_grad_(),
            target.to(device))


def test_full_text_target_without_text_ce_pulls_vision_to_p_ref(device):
    vis, txt, target = logits(device)
    tau = 0.5
    tesloss.fused_tes_loss(vis, txt, target, tau=tau, lambda_v=1.0, lambda_t=0.0,
                           reduction="sum").backward()
    expected = torch.softmax(vis.detach(), 1) - torch.softmax(txt.detach() / tau, 1)
    torch.testing.assert_close(vis.grad, expected, rtol=1e-12, atol=1e-12)


def published_recipe(vis_logits, logits_text, target, tau, lambda_v, lambda_t):
    """The authors' TeS_loss as published: soft labels under no_grad, the same
    nn.CrossEntropyLoss (mean) for both terms."""
    criterion = nn.CrossEntropyLoss()
    with torch.no_grad():
        soft_label = lambda_v * torch.softmax(logits_text / tau, dim=1)
        soft_label[torch.arange(len(target)), target] += 1.0 - lambda_v
    return criterion(vis_logits, soft_label) + lambda_t * criterion(logits_text / tau, target)


def test_the_defaults_are_the_published_recipe(device):
    vis, txt, target = logits(device, b=32, c=100)
    ours = tesloss.fused_tes_loss(vis, txt, target)
    ours.backward()
    vis2, txt2 = (x.detach().clone().requires_grad_() for x in (vis, txt))
    theirs = published_recipe(vis2, txt2, target, tau=0.03, lambda_v=0.1, lambda_t=0.3)
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vis.grad, vis2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(txt.grad, txt2.grad, rtol=1e-12, atol=1e-12)


def test_the_module_is_the_function(device):
    vis, txt, target = logits(device)
    module = tesloss.TeSLoss(tau=0.1, lambda_v=0.2, lambda_t=0.5, reduction="sum")
    assert "tau=0.1" in repr(module)
    expected = tesloss.fused_tes_loss(vis, txt, target, tau=0.1, lambda_v=0.2, lambda_t=0.5,
                                      reduction="sum")
    assert torch.equal(module(vis, txt, target), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("form", testing.TARGET_FORMS)
def test_loss_is_the_sum_of_its_parts(device, form, label_smoothing, reduction, dtype):
    # CE_eps(z, q) = (1 - lambda_v) CE_eps(z, Y) + lambda_v CE_eps(z, p_ref), q being
    # linear in Y; and CE(z, p_ref) = KL(p_ref || p_v) + H(p_ref) when eps = 0.
    lambda_v, lambda_t = 0.25, 0.4
    case = testing.build_case(
        dtype, device, batch=24, form=form, num_classes=37, seed=3, vis_scale=3.0,
        txt_scale=1.0, vis_offset=0.0, txt_offset=0.0, label_logits="anywhere",
        very_negative=False, ignore_fraction=0.25, layout="contiguous", grad_scale=1.0,
        tau=0.07, lambda_v=lambda_v, lambda_t=lambda_t, ignore_index=-100,
        reduction=reduction, label_smoothing=label_smoothing)
    with torch.no_grad():
        loss, parts = tesloss.fused_tes_loss(case.vis_logits, case.txt_logits, case.target,
                                             **case.kwargs, return_parts=True)
    loss, parts = loss.double().cpu(), parts._replace(**{
        name: value.double().cpu() for name, value in parts._asdict().items()})
    terms = ((1 - lambda_v) * parts.ce_vision, lambda_v * parts.ce_ref, lambda_t * parts.ce_text)
    rows = case.valid().sum() if reduction == "sum" else 1
    tolerance = 1e-6 if dtype == torch.float32 else 1e-13
    assert abs(loss - rows * sum(terms)) <= tolerance * rows * sum(map(abs, terms))
    if label_smoothing == 0:
        ce_ref = parts.kl_ref + parts.entropy_ref
        assert abs(parts.ce_ref - ce_ref) <= tolerance * (parts.kl_ref.abs() + parts.entropy_ref)
