"""The op as torch sees it: autograd, opcheck, torch.compile, autocast, the
constants the library exports, and the fallback when the extension is missing."""
import warnings

import pytest
import torch
from conftest import raw_forward, raw_params

import tesloss
from tesloss import _ops, functional
from tesloss.reference import tes_loss as reference_tes_loss


def problem(b=6, c=13, dtype=torch.float64, seed=0, ignore=True, device="cpu", probs=False):
    """Logits and a target: class indices (row 1 ignored), or with `probs` class
    probability rows that do not sum to 1."""
    gen = torch.Generator().manual_seed(seed)
    vis = (torch.randn(b, c, generator=gen) * 2).to(device, dtype).requires_grad_()
    txt = (torch.rand(b, c, generator=gen) * 2 - 1).to(device, dtype).requires_grad_()
    target = torch.randint(0, c, (b,), generator=gen)
    if ignore:
        target[1] = -100
    if probs:
        target = torch.rand(b, c, generator=gen).softmax(1) * 1.2
        target = target.to(torch.float64 if dtype == torch.float64 else torch.float32)
    return vis, txt, target.to(device)


# The target forms every autograd and compiler test runs with: (probability
# rows?, label_smoothing), one for each of the kernels' target kinds.
TARGETS = [(False, 0.0), (False, 0.1), (True, 0.1)]


def test_backend_info_reports_the_cpu_kernels():
    info = tesloss.backend_info()
    assert info["extension_loaded"] and info["load_error"] is None
    assert "cpu" in info["kernels_for"]
    assert info["visible_gpus"] == torch.cuda.device_count()
    assert info["cpu_capability"] in ("default", "avx2", "avx512")


def test_the_loss_and_statistics_come_back_in_fp64_for_fp64_and_fp32_otherwise():
    # The documented rule, against the table the kernels and fake kernels use.
    documented = {torch.float64: torch.float64, torch.float32: torch.float32,
                  torch.bfloat16: torch.float32, torch.float16: torch.float32}
    for dtype, acc in documented.items():
        assert _ops.acc_dtype(dtype) == acc
        vis, txt, target = problem(dtype=dtype)
        assert all(out.dtype == acc for out in raw_forward(vis, txt, target))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_float64_vision(device, reduction):
    vis, txt, target = problem(device=device)
    torch.autograd.gradcheck(
        lambda v: tesloss.fused_tes_loss(v, txt.detach(), target, tau=0.5, lambda_v=0.3,
                                         lambda_t=0.7, reduction=reduction), (vis,))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_float64_text_where_p_ref_is_not_in_the_forward(device, reduction):
    # p_ref is a constant by definition (built under no_grad), so finite
    # differences match the text gradient only where the forward does not use
    # p_ref: lambda_v = 0 leaves lambda_t * CE(t / tau, y).
    vis, txt, target = problem(device=device)
    torch.autograd.gradcheck(
        lambda v, t: tesloss.fused_tes_loss(v, t, target, tau=0.5, lambda_v=0.0, lambda_t=0.7,
                                            reduction=reduction), (vis, txt))


@pytest.mark.parametrize("probs, eps", TARGETS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradgradcheck_float64(device, reduction, probs, eps):
    # Second derivatives (create_graph=True, as in gradient penalties): of both
    # logits where p_ref is not in the forward, and of the vision logits with it.
    vis, txt, target = problem(device=device, probs=probs)
    kwargs = dict(tau=0.5, lambda_t=0.7, reduction=reduction, label_smoothing=eps)
    torch.autograd.gradgradcheck(
        lambda v, t: tesloss.fused_tes_loss(v, t, target, lambda_v=0.0, **kwargs), (vis, txt))
    torch.autograd.gradgradcheck(
        lambda v: tesloss.fused_tes_loss(v, txt.detach(), target, lambda_v=0.3, **kwargs),
        (vis,))


@pytest.mark.parametrize("probs, eps", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_a_gradient_penalty_matches_the_recipe(device, dtype, reduction, probs, eps):
    # The recipe's soft target is built under no_grad, so it is a constant at every
    # order: the penalty's gradient has no term through p_ref inside q.
    def penalty_grads(loss_fn):
        vis, txt, target = problem(dtype=dtype, device=device, b=9, c=17, probs=probs)
        loss = loss_fn(vis, txt, target, tau=0.2, lambda_v=0.3, lambda_t=0.6,
                       reduction=reduction, label_smoothing=eps)
        grad_vis, grad_txt = torch.autograd.grad(loss.sum(), (vis, txt), create_graph=True)
        (grad_vis.square().sum() + (grad_txt * grad_txt.detach().sign()).sum()).backward()
        return vis.grad, txt.grad

    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(penalty_grads(tesloss.fused_tes_loss),
                            penalty_grads(reference_tes_loss)):
        torch.testing.assert_close(ours, theirs, **tol)


@pytest.mark.parametrize("probs, eps", TARGETS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_forward_and_backward(device, reduction, dtype, probs, eps):
    vis, txt, target = problem(dtype=dtype, device=device, probs=probs)
    params = raw_params(reduction=reduction, label_smoothing=eps)
    torch.library.opcheck(torch.ops.tesloss.tes_loss_forward.default, (vis, txt, target), params)
    loss, row_stats, batch_stats = raw_forward(vis, txt, target, reduction=reduction,
                                               label_smoothing=eps)
    backward_args = (torch.ones_like(loss), vis.detach(), txt.detach(), target, row_stats,
                     batch_stats)
    torch.library.opcheck(torch.ops.tesloss.tes_loss_backward.default, backward_args, params)


@pytest.mark.parametrize("probs, eps", TARGETS)
def test_torch_compile_fullgraph_forward_and_backward(device, probs, eps):
    vis, txt, target = problem(b=8, c=50, dtype=torch.float32, device=device, probs=probs)
    vis2, txt2 = (x.detach().clone().requires_grad_() for x in (vis, txt))

    def step(v, t, y):
        loss, parts = tesloss.fused_tes_loss(v, t, y, return_parts=True, label_smoothing=eps)
        return loss * 2.0, parts.kl_ref

    compiled = torch.compile(step, fullgraph=True)
    loss, kl = compiled(vis, txt, target)
    loss.backward()
    eager_loss, eager_kl = step(vis2, txt2, target)
    eager_loss.backward()
    assert torch.equal(loss, eager_loss) and torch.equal(kl, eager_kl)
    assert torch.equal(vis.grad, vis2.grad) and torch.equal(txt.grad, txt2.grad)


def test_cpu_autocast_passes_bf16_through_and_returns_an_fp32_loss():
    torch.manual_seed(0)
    features = torch.randn(8, 16)
    classifier = torch.nn.Linear(16, 10)
    text_head = torch.nn.functional.normalize(torch.randn(10, 16), dim=1)
    target = torch.randint(0, 10, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vis = classifier(features)
        txt = torch.nn.functional.normalize(features, dim=1) @ text_head.t()
        assert vis.dtype == txt.dtype == torch.bfloat16
        vis.retain_grad()
        loss = tesloss.fused_tes_loss(vis, txt, target)
    assert loss.dtype == torch.float32
    # Same bits as the op called on those bf16 logits directly: no up-cast pass.
    assert torch.equal(loss, tesloss.fused_tes_loss(vis.detach(), txt.detach(), target))
    loss.backward()
    assert vis.grad.dtype == torch.bfloat16
    assert classifier.weight.grad is not None


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_the_backward_runs_the_op_and_allocates_the_two_gradients_nothing_else(reduction):
    # No zero gradients for the statistics outputs, no dtype casts, no copies:
    # on a GPU each of those would be a kernel launch (tests/test_cuda.py counts them).
    # The text logits need no gradient, so the step takes the two passes
    # (test_single_pass.py has the single pass's backward).
    vis = torch.randn(16, 40, requires_grad=True)
    txt = torch.randn(16, 40)
    target = torch.randint(0, 40, (16,))
    loss = tesloss.fused_tes_loss(vis, txt, target, reduction=reduction)
    grad_out = torch.ones_like(loss)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.autograd.grad(loss, (vis,), grad_out)
    ops = [event.name for event in prof.events() if "::" in event.name
           and not event.name.startswith(("autograd::", "torch::autograd::"))]
    assert ops.count("tesloss::tes_loss_backward") == 1, ops
    others = [name for name in ops if name != "tesloss::tes_loss_backward"]
    assert len(others) == 2 and all(name.startswith("aten::empty") for name in others), ops


def test_missing_extension_falls_back_to_the_reference_and_warns_once(monkeypatch):
    monkeypatch.setattr(_ops, "has_kernel", lambda device: False)
    monkeypatch.setattr(functional, "_warned_fallback", set())
    monkeypatch.delenv("TESLOSS_REQUIRE_EXTENSION", raising=False)
    vis, txt, target = problem()
    with pytest.warns(RuntimeWarning, match="reference instead.*python -m tesloss.build"):
        loss = tesloss.fused_tes_loss(vis, txt, target)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tesloss.fused_tes_loss(vis, txt, target)  # the warning came once
    torch.testing.assert_close(loss, reference_tes_loss(vis, txt, target), rtol=0, atol=0)
    with pytest.raises(IndexError, match=r"target\[0\] = 13 is out of range"):
        tesloss.fused_tes_loss(vis, txt, torch.full_like(target, 13))


def test_require_extension_turns_the_fallback_into_an_error(monkeypatch):
    monkeypatch.setattr(_ops, "has_kernel", lambda device: False)
    monkeypatch.setenv("TESLOSS_REQUIRE_EXTENSION", "1")
    vis, txt, target = problem()
    with pytest.raises(RuntimeError, match="TESLOSS_REQUIRE_EXTENSION is set.*python -m tesloss.build"):
        tesloss.fused_tes_loss(vis, txt, target)


def test_the_fallback_returns_what_the_compiled_op_returns(monkeypatch):
    # An fp32 loss for half-type logits, gradients in the logits' dtype, and exact
    # zero gradients for ignored rows, whatever their logits hold.
    monkeypatch.setattr(_ops, "has_kernel", lambda device: False)
    monkeypatch.delenv("TESLOSS_REQUIRE_EXTENSION", raising=False)
    for dtype in (torch.bfloat16, torch.float16):
        vis, txt, target = problem(dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = tesloss.fused_tes_loss(vis, txt, target)
        loss.backward()
        assert loss.dtype == torch.float32 and vis.grad.dtype == txt.grad.dtype == dtype
    vis, txt, target = problem()
    with torch.no_grad():
        vis[1] = float("nan")  # row 1 is ignored
        txt[1] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = tesloss.fused_tes_loss(vis, txt, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.equal(vis.grad[1], torch.zeros_like(vis.grad[1]))
    assert torch.equal(txt.grad[1], torch.zeros_like(txt.grad[1]))


@pytest.mark.parametrize("probs, eps", TARGETS)
def test_the_fallback_takes_every_target(monkeypatch, probs, eps):
    monkeypatch.setattr(_ops, "has_kernel", lambda device: False)
    monkeypatch.delenv("TESLOSS_REQUIRE_EXTENSION", raising=False)
    vis, txt, target = problem(probs=probs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fallback = tesloss.fused_tes_loss(vis, txt, target, label_smoothing=eps)
    monkeypatch.undo()
    compiled = tesloss.fused_tes_loss(vis, txt, target, label_smoothing=eps)
    torch.testing.assert_close(fallback, compiled, rtol=1e-12, atol=1e-12)
