"""Where fused losses usually lose to the recipe they replace, on every device: long
batch sums, confident rows, shifted logits, small tau with saturated text rows, huge
logits. Each case is held to conftest's rule (at most twice the recipe's error in the
same dtype, against a float64 truth); rows near zero loss have rules of their own.
bench/bench_numerics.py prints the same regimes' figures.
"""
import math

import pytest
import torch
from conftest import check_against_reference, for_the_emulator

import tesloss
from tesloss.reference import tes_loss as reference_tes_loss
from tesloss.testing import (ALL_DTYPES, Case, FLOOR_ULPS, FOUND_BY_FUZZ, OPEN_FINDINGS,
                             PARAMETER_EDGES, RULE_FACTOR, build_case, confident, edge_case,
                             offset, on_device, parameter_edge_case, problem, run,
                             run_reference64, scales, subnormal_weights_case)
from tesloss.testing import extended
from tesloss.testing.cases import draw_probs


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("target", ["index", "probs"])
@pytest.mark.parametrize("edge", PARAMETER_EDGES)
def test_parameters_at_their_edges(device, dtype, target, edge):
    check_against_reference(parameter_edge_case(edge, dtype, target), dtype, device)


def test_a_newcomers_first_failure(device):
    # The draw of that first `make test`: the label's weight 1 - lambda_v is the
    # whole row's target weight where p_ref puts none on the label.
    case = Case(torch.tensor([[-1e4, -0.293, -2.18]], dtype=torch.float64),
                torch.tensor([[0.0, 0.5, 0.2]], dtype=torch.float64), torch.tensor([0]),
                torch.tensor(1.0, dtype=torch.float64),
                dict(tau=1e-4, lambda_v=0.99999, lambda_t=0.0, ignore_index=-100,
                     reduction="mean"))
    check_against_reference(case, torch.float32, device)


# Rows whose spread of logits passes the largest float (a difference to the
# max overflows the accumulation type) while the loss, which weighs it, does not.
SPREAD_OUT = {
    "recipe": (0, dict()),
    "lambda_v 1 - 1e-5, label at -max": (3, dict(lambda_v=1 - 1e-5)),
    "smoothed": (0, dict(label_smoothing=0.1)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("target", ["index", "probs"])
@pytest.mark.parametrize("spread", SPREAD_OUT)
def test_a_finite_loss_wherever_the_truth_is_finite(device, dtype, target, spread):
    # bf16 logits [max, max, 0, -max] gave a loss of inf; the truth is 2.54e37.
    label, kwargs = SPREAD_OUT[spread]
    top = torch.finfo(dtype).max
    vis = torch.tensor([[top, top, 0.0, -top]], dtype=dtype)
    txt = torch.zeros(1, 4, dtype=dtype)
    y = torch.tensor([label])
    if target == "probs":
        y = torch.nn.functional.one_hot(y, 4).double() * 0.8 + 0.05
    truth = reference_tes_loss(vis.double(), txt.double(), y, **kwargs)
    assert math.isfinite(truth.item()) and truth.item() > 1e36
    vis, txt = (x.to(device).requires_grad_() for x in (vis, txt))
    loss = tesloss.fused_tes_loss(vis, txt, y.to(device).to(torch.float32) if target == "probs"
                                  else y.to(device), **kwargs)
    loss.backward()
    assert loss.item() == pytest.approx(truth.item(), rel=1e-5)
    assert torch.isfinite(vis.grad).all() and torch.isfinite(txt.grad).all()


def test_a_finite_loss_where_the_text_cross_entropy_alone_overflows(device):
    # (max t - t_y) / tau = 4e38 passes fp32's largest float; lambda_t times it
    # does not. The recipe in fp32 gives inf.
    vis = torch.zeros(1, 2, device=device, requires_grad=True)
    txt = torch.tensor([[1.0, -1.0]], device=device, requires_grad=True)
    kwargs = dict(tau=5e-39, lambda_t=1e-7)
    truth = reference_tes_loss(vis.detach().double().cpu(), txt.detach().double().cpu(),
                               torch.tensor([1]), **kwargs)
    loss = tesloss.fused_tes_loss(vis, txt, torch.tensor([1], device=device), **kwargs)
    loss.backward()
    assert loss.item() == pytest.approx(truth.item(), rel=1e-5)
    assert torch.isfinite(txt.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", ["text", "vision"])
def test_subnormal_weights_that_large_factors_make_normal(device, which, dtype):
    check_against_reference(subnormal_weights_case(dtype, which), dtype, device)


# (shape, the emulator's, which takes about 20 thousand rows a second: still
# several sweeps of its H200 grid, 33792 rows of C = 2 and 8448 of C = 1000).
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape, emulated", [((16384, 1000), (9000, 1000)),
                                             ((65536, 2), (65536, 2)), ((2**20, 2), (2**17, 2))])
def test_long_batch_sums(device, shape, emulated, reduction):
    shape = for_the_emulator(device, shape, emulated)
    check_against_reference(problem(*shape, reduction=reduction), torch.float32, device)


def test_the_mean_over_25_million_rows_is_the_row_loss(device):
    # Equal rows, so the mean is one row's loss: a sum in fp32 one row after the
    # other stops growing at 2^24 (the mean came out 1.0 instead of 0.90). The
    # emulated CUDA kernels would take 20 minutes: they sum 2^17 rows, which
    # checks their batch sum's tree but not the threshold, which a GPU's run
    # reaches.
    batch = for_the_emulator(device, 2**24 + 2**23, 2**17)
    vis = torch.zeros(batch, 2, device=device)
    target = torch.zeros(batch, dtype=torch.long, device=device)
    row = reference_tes_loss(vis[:1].double().cpu(), vis[:1].double().cpu(), target[:1].cpu())
    loss = tesloss.fused_tes_loss(vis, vis, target)
    assert abs(loss.item() - row.item()) <= FLOOR_ULPS * torch.finfo(torch.float32).eps * row


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_batches_of_confident_and_ordinary_rows(device, dtype, reduction):
    case = confident(problem(512, 100, seed=2, reduction=reduction), every=2)
    check_against_reference(case, dtype, device)


def row_by_row(case, device, floor_unit):
    """Each row's fused loss errs at most RULE_FACTOR times the recipe's fp32 error on
    that row, plus FLOOR_ULPS ulps of floor_unit(truth)."""
    vis, txt, target = (on_device(x, device) for x in (case.vis_logits, case.txt_logits,
                                                       case.target))
    truth = reference_tes_loss(vis.double(), txt.double(), target, **case.kwargs)
    fused = tesloss.fused_tes_loss(vis.float(), txt.float(), target, **case.kwargs)
    recipe = reference_tes_loss(vis.float(), txt.float(), target, **case.kwargs)
    eps = torch.finfo(torch.float32).eps
    allowed = RULE_FACTOR * (recipe.double() - truth).abs() + FLOOR_ULPS * eps * floor_unit(truth)
    bad = (fused.double() - truth).abs() > allowed
    assert not bad.any(), f"{int(bad.sum())} of {len(bad)} rows: {fused[bad][:3]} vs {truth[bad][:3]}"
    return truth


@pytest.mark.parametrize("tau", [0.03, 2**-5])
def test_confident_rows_are_each_as_accurate_as_the_recipe(device, tau):
    # Row by row, with conftest's floor: ulps of 1 + lambda_t, what a loss made of
    # logs of sums near 1 is resolved in by any fp32 implementation.
    case = confident(problem(512, 100, seed=3, reduction="none", tau=tau))
    truth = row_by_row(case, device, lambda truth: truth.abs() + 1 + case.kwargs["lambda_t"])
    assert truth.max() < 1e-5, "the rows are confident"


@pytest.mark.parametrize("tau", [0.03, 2**-5])
def test_confident_rows_soft_target_terms_are_as_accurate_as_the_recipes(device, tau):
    # With the vision head sure by 40 (its log-sum is exactly 0 in fp32) and no text
    # CE, a row's loss is lambda_v * <p_ref, max z - z>: text weights far below the
    # max, where a formula that subtracts large terms loses everything. The worst
    # row's relative error against the recipe's worst: fp32 differences t_c - t_y
    # err by ~1e-6 relative after 1 / tau in both, so row by row it is a draw.
    case = confident(problem(512, 100, seed=10, reduction="none", tau=tau, lambda_t=0.0),
                     vis_margin=40.0)
    vis, txt, target = (on_device(x, device) for x in (case.vis_logits, case.txt_logits,
                                                       case.target))
    truth = reference_tes_loss(vis.double(), txt.double(), target, **case.kwargs)
    fused = tesloss.fused_tes_loss(vis.float(), txt.float(), target, **case.kwargs)
    recipe = reference_tes_loss(vis.float(), txt.float(), target, **case.kwargs)
    assert truth.max() < 1e-3 and (truth > 0).all(), "the rows are confident"
    worst_fused = ((fused.double() - truth).abs() / truth).max().item()
    worst_recipe = ((recipe.double() - truth).abs() / truth).max().item()
    assert worst_fused <= RULE_FACTOR * worst_recipe + FLOOR_ULPS * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_every_row_loss_is_at_least_zero(device, dtype):
    cases = [confident(problem(2048, 100, seed=4, reduction="none")),
             confident(problem(2048, 100, seed=5, reduction="none", lambda_v=0.0, lambda_t=1.0),
                       vis_margin=100.0, txt_margin=0.9),
             offset(problem(2048, 1000, seed=6, reduction="none", lambda_v=1.0), 1e4, 100.0)]
    for case in cases:
        rows = tesloss.fused_tes_loss(on_device(case.vis_logits, device, dtype),
                                      on_device(case.txt_logits, device, dtype),
                                      case.target.to(device), **case.kwargs)
        assert (rows >= 0).all(), f"{int((rows < 0).sum())} rows < 0, min {rows.min().item()}"


def test_a_confident_row_is_zero_not_negative(device):
    # Was -1.9e-6: lse - <p_ref, z> and the text term cancelled. The truth is 9.3e-14.
    vis = torch.tensor([[100.0, 0.0]], device=device)
    txt = torch.tensor([[0.9, 0.0]], device=device)
    loss = tesloss.fused_tes_loss(vis, txt, torch.tensor([0], device=device), lambda_v=0.0,
                                  lambda_t=1.0)
    assert 0 <= loss.item() <= 1e-13


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("vis_offset, txt_offset, tau", [(1e4, 0.0, 0.03), (0.0, 100.0, 0.03),
                                                         (0.0, 100.0, 2**-5), (1e4, 100.0, 0.1)])
def test_shifted_logits(device, dtype, vis_offset, txt_offset, tau):
    case = offset(problem(256, 1000, seed=7, reduction="none", tau=tau), vis_offset, txt_offset)
    check_against_reference(case, dtype, device)


def test_a_shift_leaves_cross_entropy_as_it_was(device):
    # Was 0.31348, where F.cross_entropy gives 0.31326 (the truth).
    vis = torch.tensor([[1e4, 1e4 - 1]], device=device)
    target = torch.tensor([0], device=device)
    ours = tesloss.fused_tes_loss(vis, vis, target, lambda_v=0.0, lambda_t=0.0)
    assert ours.item() == torch.nn.functional.cross_entropy(vis, target).item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tau", [1e-3, 1e-4])
def test_small_tau_with_saturated_text_rows(device, dtype, tau):
    case = problem(256, 100, seed=8, reduction="none", tau=tau)
    txt = case.txt_logits.clamp(max=0.9)
    txt[torch.arange(256), case.target] = 1.0  # the text argmax is the label
    case = Case(case.vis_logits, txt, case.target, case.grad_out, case.kwargs)
    check_against_reference(case, dtype, device)
    # There the text gradient is about (lambda_t / tau) exp(-0.1 / tau) < 1e-40; it was
    # -0.014 at tau = 1e-3, when the max class's exponent was not exactly 0.
    vis, txt = (on_device(x, device, dtype).requires_grad_() for x in (case.vis_logits, txt))
    tesloss.fused_tes_loss(vis, txt, case.target.to(device), **case.kwargs).sum().backward()
    assert txt.grad.abs().max() < 1e-30


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("num_classes", [1022, 4096, 16384])
def test_mixup_rows_against_masked_classes(device, dtype, num_classes):
    # timm's Mixup rows are mostly its floor of 0.1 / C, so against classes masked
    # to -1e4 CE(z, Y) = sum(Y) lse(z) + <Y, max z - z> is a sum of thousands of
    # alike terms. Added one after another, 128 per vector lane (AVX2), their
    # half-ulp losses added up: the loss erred 1.7 times what the rule allows (C = 1022).
    case = problem(16, num_classes, seed=12, lambda_v=0.0, lambda_t=0.0, reduction="sum")
    gen = torch.Generator().manual_seed(13)
    vis = case.vis_logits.masked_fill(torch.rand(case.shape, generator=gen) < 0.7, -1e4)
    probs = draw_probs("mixup", case.target, num_classes, gen, dtype)
    check_against_reference(Case(vis, case.txt_logits, probs, case.grad_out, case.kwargs),
                            dtype, device)


@pytest.mark.parametrize("found", FOUND_BY_FUZZ)
def test_what_random_draws_found(device, found):
    dtype, drawn = FOUND_BY_FUZZ[found]
    check_against_reference(build_case(dtype, **drawn), dtype, device)


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="open findings, each with its cause in regimes.py")
@pytest.mark.parametrize("found", OPEN_FINDINGS)
def test_what_random_draws_found_that_is_not_fixed_yet(device, found):
    dtype, drawn = OPEN_FINDINGS[found]
    check_against_reference(build_case(dtype, **drawn), dtype, device)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_a_mixup_pair_against_confident_logits(device, dtype):
    # Hypothesis's case: two rows mixed from classes 2053 and 3099, every other
    # weight timm's floor 0.1 / C, against logits thousands apart. The max class's
    # gradient is g (sum(Y) - 0.1 / C), so all of its error is the mass's: summed
    # plainly in runs per lane, then merged, the mass was 4.8 ulps off in fp32, and
    # that gradient erred 6.8e-7 where the rule allows 6.6e-7 (AVX2 and AVX-512).
    case = problem(2, 4096, seed=31, vis_scale=1e4, tau=1e-4, lambda_v=0.0, lambda_t=0.0)
    probs = torch.full(case.shape, 0.1 / 4096, dtype=torch.float64)
    probs[:, [2053, 3099]] = torch.tensor([[0.5253255367279053, 0.37472331523895264],
                                           [0.37472331523895264, 0.5253255367279053]],
                                          dtype=torch.float64)
    probs = probs.to(dtype).double()  # drawn in the case's dtype, as draw_probs does
    check_against_reference(Case(case.vis_logits, case.txt_logits, probs,
                                 torch.tensor(-2.5, dtype=torch.float64), case.kwargs),
                            dtype, device)


@pytest.mark.parametrize("tau", [1e-9, 1e-30])
def test_tied_text_logits_at_tiny_tau(device, tau):
    # Was a loss of -3.6 at 1e-9 and nan at 1e-30: the max class's exponent was not 0.
    vis = torch.tensor([[20.0, 0.0]], device=device, requires_grad=True)
    txt = torch.tensor([[0.3, 0.3]], device=device, requires_grad=True)
    loss = tesloss.fused_tes_loss(vis, txt, torch.tensor([0], device=device), tau=tau,
                                  lambda_v=0.0, lambda_t=1.0)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    torch.testing.assert_close(txt.grad.cpu(), torch.tensor([[-0.5, 0.5]]) / tau)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_huge_logits_where_the_recipe_is_finite(device, dtype):
    # Logits up to 1e38 (bf16: up to its max), so that |z| * C is far past the
    # largest float while the spread of each row is not.
    case = problem(64, 100, seed=9, reduction="none")
    top = torch.finfo(torch.bfloat16).max if dtype == torch.bfloat16 else 1e38
    vis = case.vis_logits.abs() / case.vis_logits.abs().amax() * top
    case = Case(vis.to(dtype).double(), case.txt_logits, case.target, case.grad_out,
                case.kwargs)
    check_against_reference(case, dtype, device)


def test_the_fp64_truth_is_exact_where_the_fp64_recipe_is_not():
    # 20000 classes: the recipe's float64 sums erred 9.2e-15 at [3, 1439] on an
    # AVX2 machine, past the rule's 4.9e-15; the truth is the closed form in long
    # double (tesloss/testing/extended.py), held here to an mpmath evaluation.
    mpmath = pytest.importorskip("mpmath")
    if not extended.WIDER:
        pytest.skip("long double is no wider than double here")
    mpmath.mp.dps = 40
    case = edge_case(torch.float64, 20000, "contiguous", 5, "smoothed")
    _, grad_vis, grad_txt = run_reference64(case)
    kw = case.kwargs
    row = 3
    z = [mpmath.mpf(float(v)) for v in case.vis_logits[row]]
    s = [mpmath.mpf(float(v)) / mpmath.mpf(kw["tau"]) for v in case.txt_logits[row]]
    top_z, top_s = max(z), max(s)  # once: in the sums' generators it cost O(C^2)
    sum_z = mpmath.fsum(mpmath.exp(v - top_z) for v in z)
    sum_s = mpmath.fsum(mpmath.exp(v - top_s) for v in s)
    eps, n = kw["label_smoothing"], int(case.valid().sum())
    g = mpmath.mpf(float(case.grad_out)) / n
    label = int(case.target[row])
    for col in sorted({label, *grad_vis[row].abs().topk(4).indices.tolist()}):
        p_vis = mpmath.exp(z[col] - top_z) / sum_z
        p_ref = mpmath.exp(s[col] - top_s) / sum_s
        y = 1 if col == label else 0
        q = kw["lambda_v"] * p_ref + (1 - kw["lambda_v"]) * y
        uniform = mpmath.mpf(eps) / 20000
        exact_vis = g * (p_vis - (1 - eps) * q - uniform)
        exact_txt = g * kw["lambda_t"] / kw["tau"] * (p_ref - (1 - eps) * y - uniform)
        for got, exact in ((grad_vis[row, col], exact_vis), (grad_txt[row, col], exact_txt)):
            assert abs(float(got) - float(exact)) <= math.ulp(float(exact)), (col, got, exact)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("target", ["index", "smoothed", "probs"])
def test_the_fp64_truth_is_the_recipe_refined(reduction, target):
    # The closed form is the recipe's mathematics: on an ordinary batch with an
    # ignored row the two differ only by the recipe's rounding.
    case = edge_case(torch.float64, 3000, "contiguous", 11, target)
    case.kwargs["reduction"] = reduction
    if reduction == "none":
        case.grad_out = torch.linspace(-2, 2, 11, dtype=torch.float64)
    truth = run_reference64(case)
    recipe = run(reference_tes_loss, case, torch.float64)
    for t, r, scale in zip(truth, recipe, scales(case)):
        assert torch.allclose(t, r, rtol=0, atol=1e-13 * float(torch.as_tensor(scale).max()))
        assert torch.isnan(t[torch.isnan(r)]).all()
