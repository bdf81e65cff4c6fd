"""A training step's single pass: where both logits require grad, the forward
writes the gradients for an upstream gradient of 1, and the backward hands them
over, once. Whatever path a step takes, autograd's answers are the two passes'."""
import conftest
import pytest
import torch
from conftest import raw_backward, raw_forward, raw_params
from emulated_cuda import runs_cuda_kernels
from test_torch_integration import TARGETS, problem

import tesloss


def two_passes(vis, txt, target, grad_loss, **kwargs):
    """The gradients of the raw forward op then the raw backward op: the two passes."""
    loss, row_stats, batch_stats = raw_forward(vis.detach(), txt.detach(), target, **kwargs)
    return raw_backward(grad_loss.expand_as(loss), vis.detach(), txt.detach(), target, row_stats,
                        batch_stats, **kwargs)


def tesloss_ops(step):
    """The names of the tesloss ops `step()` runs, in order."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return [event.name.split("::")[1] for event in prof.events()
            if event.name.startswith(("tesloss::", "tesloss_emulated::"))]


@pytest.mark.parametrize("probs, eps", TARGETS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_a_step_gives_the_bits_of_the_two_passes(device, dtype, reduction, probs, eps):
    vis, txt, target = problem(b=9, c=1500, dtype=dtype, device=device, probs=probs)
    kwargs = dict(reduction=reduction, label_smoothing=eps)
    loss = tesloss.fused_tes_loss(vis, txt, target, **kwargs)
    loss.backward(torch.ones_like(loss))
    expected = two_passes(vis, txt, target, torch.ones_like(loss), **kwargs)
    assert torch.equal(vis.grad, expected[0]) and torch.equal(txt.grad, expected[1])


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_an_upstream_gradient_other_than_one(device, dtype, reduction):
    # The single pass's gradients are for an upstream gradient of 1: another
    # scales them in place, except in fp16, where gradients that underflowed at
    # 1 would stay lost (a GradScaler's g is there to keep them): the two passes
    # (on a GPU, where g is not read on the host, fp16 takes no single pass).
    vis, txt, target = problem(b=9, c=300, dtype=dtype, device=device)
    grad_loss = (torch.tensor(-2.5) if reduction == "mean"
                 else torch.linspace(-3, 3, len(target))).to(device)
    loss = tesloss.fused_tes_loss(vis, txt, target, reduction=reduction)
    loss.backward(grad_loss)
    two = two_passes(vis, txt, target, grad_loss, reduction=reduction)
    if dtype == torch.float16:
        assert torch.equal(vis.grad, two[0]) and torch.equal(txt.grad, two[1])
        return
    unit = two_passes(vis, txt, target, torch.ones_like(grad_loss), reduction=reduction)
    g = grad_loss.unsqueeze(1) if reduction == "none" else grad_loss
    # Multiplied in float, rounded once. The accuracy rule holds them as it holds
    # the two passes: test_fused_loss and test_numerics draw upstream gradients
    # other than 1.
    for got, at_one in zip((vis.grad, txt.grad), unit):
        assert torch.equal(got, (at_one.float() * g).to(dtype))


@pytest.mark.parametrize("upstream", [float("nan"), float("inf"), -2.5])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_an_ignored_row_gets_zero_gradients_whatever_its_upstream_gradient(
        device, dtype, reduction, upstream):
    # As F.cross_entropy's and the two passes': the row adds nothing, so g is
    # never multiplied into it (0 * nan would be nan, and 0 * -2.5 is -0).
    vis, txt, target = problem(b=9, c=300, dtype=dtype, device=device)  # row 1 ignored
    if reduction == "none":  # the odd value at the ignored row only
        grad_loss = torch.linspace(-3, 3, len(target))
        grad_loss[1] = upstream
    else:
        grad_loss = torch.tensor(upstream)
    grad_loss = grad_loss.to(device)
    tesloss.fused_tes_loss(vis, txt, target, reduction=reduction).backward(grad_loss)
    two = two_passes(vis, txt, target, grad_loss, reduction=reduction)
    for got, expected in zip((vis.grad, txt.grad), two):
        assert torch.equal(got[1], torch.zeros_like(got[1]))
        assert not torch.signbit(got[1]).any()  # +0, the bits of the two passes
        assert torch.equal(expected[1], got[1])


def test_a_second_backward_of_a_retained_graph_gives_the_same_gradients(device):
    vis, txt, target = problem(b=9, c=300, dtype=torch.float32, device=device)
    loss = tesloss.fused_tes_loss(vis, txt, target)
    first = torch.autograd.grad(loss, (vis, txt), retain_graph=True)
    second = torch.autograd.grad(loss, (vis, txt))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    # The first gradients are not written again: still the two passes'.
    expected = two_passes(vis, txt, target, torch.ones_like(loss))
    assert all(torch.equal(a, b) for a, b in zip(first, expected))


def test_micro_batches_accumulate_into_grad(device):
    vis, txt, target = problem(b=8, c=300, dtype=torch.float32, device=device, ignore=False)
    for half in (slice(0, 4), slice(4, 8)):
        tesloss.fused_tes_loss(vis[half], txt[half], target[half]).backward()
    separate = [two_passes(vis[half], txt[half], target[half], torch.ones(()))
                for half in (slice(0, 4), slice(4, 8))]
    assert torch.equal(vis.grad, torch.cat([separate[0][0], separate[1][0]]))
    assert torch.equal(txt.grad, torch.cat([separate[0][1], separate[1][1]]))


def test_the_gradients_in_grad_are_the_ones_handed_over_not_copies(device):
    vis, txt, target = problem(b=8, c=300, dtype=torch.float32, device=device)
    loss = tesloss.fused_tes_loss(vis, txt, target)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss.backward()
    copies = [e.name for e in prof.events() if e.name in ("aten::copy_", "aten::clone")]
    assert copies == [] and vis.grad is not None and txt.grad is not None


@pytest.mark.parametrize("which", ["vis_logits", "txt_logits"])
def test_with_one_logit_requiring_grad_no_gradient_is_written_for_the_other(device, which):
    vis, txt, target = problem(b=9, c=300, dtype=torch.float32, device=device)
    if which == "vis_logits":
        txt = txt.detach()
    else:
        vis = vis.detach()
    ops = tesloss_ops(lambda: tesloss.fused_tes_loss(vis, txt, target).backward())
    assert "tes_loss_step" not in ops and "tes_loss_backward" in ops
    grad = (vis if which == "vis_logits" else txt).grad
    expected = two_passes(vis, txt, target, torch.ones(()))
    assert torch.equal(grad, expected[0 if which == "vis_logits" else 1])


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_without_grad_mode_the_forward_does_no_gradient_work(device, mode):
    vis, txt, target = problem(b=9, c=300, dtype=torch.float32, device=device)
    with mode():
        ops = tesloss_ops(lambda: tesloss.fused_tes_loss(vis, txt, target))
    assert ops == ["tes_loss_forward"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_step_runs_one_op_and_its_backward_none(device, dtype):
    vis, txt, target = problem(b=9, c=300, dtype=dtype, device=device)
    forward_ops = tesloss_ops(lambda: tesloss.fused_tes_loss(vis, txt, target))
    loss = tesloss.fused_tes_loss(vis, txt, target)
    backward_ops = tesloss_ops(loss.backward)
    # The autograd op is tes_loss_forward, whichever kernels it then runs.
    if dtype == torch.float16 and runs_cuda_kernels(device):
        # A GPU's backward cannot tell a GradScaler's g from 1 without a wait.
        assert "tes_loss_step" not in forward_ops and backward_ops == ["tes_loss_backward"]
    else:
        assert forward_ops == ["tes_loss_forward", "tes_loss_step"] and backward_ops == []


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_the_callers_logits_are_never_written(device, reduction):
    vis, txt, target = problem(b=9, c=300, dtype=torch.float32, device=device)
    before = vis.detach().clone(), txt.detach().clone(), target.clone()
    loss = tesloss.fused_tes_loss(vis, txt, target, reduction=reduction)
    loss.sum().backward()
    after = vis.detach(), txt.detach(), target
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("probs, eps", TARGETS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_the_single_pass_op(device, reduction, dtype, probs, eps):
    vis, txt, target = problem(dtype=dtype, probs=probs, device=device)
    params = raw_params(reduction=reduction, label_smoothing=eps)
    torch.library.opcheck(conftest.RAW_OPS.tes_loss_step.default, (vis, txt, target), params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_too_large_for_the_caches_are_the_same_bits(dtype):
    # Past 16 MB of gradients the CPU kernels store them past the caches, after a
    # head of columns that aligns each row (odd C: every row its own head); the
    # bits are those of a batch small enough to be stored plainly.
    vis, txt, target = problem(b=200, c=21001, dtype=dtype)
    kwargs = dict(reduction="sum")
    tesloss.fused_tes_loss(vis, txt, target, **kwargs).backward()
    rows = slice(0, 7)
    few = [x[rows].detach().clone().requires_grad_() for x in (vis, txt)]
    tesloss.fused_tes_loss(*few, target[rows], **kwargs).backward()
    assert torch.equal(vis.grad[rows], few[0].grad) and torch.equal(txt.grad[rows], few[1].grad)
    two = two_passes(vis, txt, target, torch.ones(()), **kwargs)
    assert torch.equal(vis.grad, two[0]) and torch.equal(txt.grad, two[1])
