"""Special cases of the TeS loss that have closed forms (those of class
probabilities and label smoothing, cross-entropy among them, are test_targets.py's)."""
import torch
from torch import nn

import tesloss


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


def test_loss_is_the_sum_of_its_parts(device):
    # CE(z, q) = (1 - lambda_v) CE(z, y) + lambda_v (KL(p_ref || p_v) + H(p_ref))
    vis, txt, target = logits(device)
    tau, lambda_v, lambda_t = 0.07, 0.25, 0.4
    loss, parts = tesloss.fused_tes_loss(vis, txt, target, tau=tau, lambda_v=lambda_v,
                                         lambda_t=lambda_t, return_parts=True)
    p_ref = torch.softmax(txt.detach() / tau, 1)
    entropy = -(p_ref * p_ref.log()).sum(1).mean()
    rebuilt = ((1 - lambda_v) * parts.ce_vision + lambda_v * (parts.kl_ref + entropy)
               + lambda_t * parts.ce_text)
    torch.testing.assert_close(loss.detach(), rebuilt, rtol=1e-12, atol=1e-12)
