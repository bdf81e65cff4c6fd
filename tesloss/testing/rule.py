"""The accuracy rule every kernel is held to, and the float64 truth it is held
against: the recipe (tesloss.reference) run in float64 on the inputs as a kernel
reads them, its values refined in long double for float64 inputs. The test
suite and ``python -m tesloss.check`` both use it; a failure raises AssertionError with what erred, by how much, and the bound.
"""
import dataclasses
import math

import torch

from .. import _ops
from . import extended
from ..functional import fused_tes_loss
from ..reference import tes_loss as reference_tes_loss
from .cases import on_device

# The rule every kernel is held to (assert_matches_reference): against a float64
# truth, each output of the fused op (loss, grad vis_logits, grad txt_logits)
# errs at most RULE_FACTOR times as much as the recipe computed in the inputs'
# dtype with plain torch ops, plus a floor of FLOOR_ULPS units in the last place
# of the output's dtype. An output's error is its largest elementwise error.
# The floor's unit is the output's largest true value, and at least what the
# output is resolved in: a row's loss holds log(sum_vis) + lambda_t *
# log(sum_txt), each sum >= 1 and so rounded in ulps of 1, whence 1 + lambda_t
# per row; every gradient is g times a difference of probabilities, resolved
# in ulps of g, the largest upstream gradient (times lambda_t / tau for the
# text logits). For float64 there is no recipe in a narrower dtype to compare
# with: the truth is the closed form in long double (extended.py), and the
# bound FLOOR_ULPS units of float64 times the size of what rounding acts on
# (scales).
# Rows near zero loss, where this rule is loose, have rules of their own
# (test_numerics.py): every row loss >= 0, and batches of confident rows.
#
# Gradients are also held to the rule element by element
# (assert_elements_match): each element errs at most RULE_FACTOR times the
# recipe's largest error on the elements of its size, plus FLOOR_ULPS ulps of
# its size, not of the upstream gradient. An element is a difference,
# g (sum(w') p_v - w') or g lambda_t / tau (sum(Y') p_ref - Y'), and its size
# is the size of the terms it takes the difference of (gradient_sizes): what
# any implementation that forms the terms rounds in. Sizes are grouped by
# their power of two.
RULE_FACTOR = 2.0
FLOOR_ULPS = 4


# Comparisons of other quantities with the fp64 reference (logged parts, spot
# checks): |fused - ref| <= atol * scale + rtol * |ref|, where `scale` is the
# size of what rounding acts on (see scales).
@dataclasses.dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float


HALF_DTYPES = (torch.bfloat16, torch.float16)
ALL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def run(loss_fn, case, dtype=None, device="cpu", **extra):
    """Loss and both gradients of `loss_fn` on the case, inputs cast to `dtype` and
    moved to `device` in their layout; results on the CPU."""
    vis, txt = case.leaves(dtype, device)
    target = on_device(case.target, device)  # in its layout, as the kernels get it
    if case.probs and loss_fn is reference_tes_loss:
        # The recipe reads probabilities in the logits' dtype: exactly, for they are
        # drawn in the case's.
        target = target.to(vis.dtype)
    loss = loss_fn(vis, txt, target, **case.kwargs, **extra)
    loss.backward(case.grad_out.to(device, loss.dtype))
    return loss.detach().cpu(), vis.grad.cpu(), txt.grad.cpu()


def run_reference64(case, dtype=torch.float64):
    """The float64 truth: the recipe in float64 on the case's logits as a kernel reads
    them in `dtype` (rounded to it), so that no error of the inputs counts. For
    float64 logits its finite values come from the closed form in long double
    (extended.py): the recipe's own float64 error can pass the float64 rule."""
    rounded = dataclasses.replace(case, vis_logits=case.vis_logits.to(dtype),
                                  txt_logits=case.txt_logits.to(dtype))
    recipe = run(reference_tes_loss, rounded, torch.float64)
    return extended.refined(case, dtype, recipe) if dtype == torch.float64 else recipe


def scales(case):
    """Per-output error scales: rounding errs by about eps * |value| in each
    quantity the formulas add up, so a row's scale is the size of those.

    Loss: m * (1 + |lse(z)| + |lse(s)|) + <p_ref, |z|> + <|Y'|, |z|> + <|Y'|, |s|>,
    plus lambda_v * <p_ref, |s| |z - <p_ref, z>|>: s = t / tau is rounded, and
    <p_ref, z> moves with s by p_ref * (z - <p_ref, z>). Y' is the smoothed
    target (onehot(y) for a class index and no smoothing, where the terms are
    |z_y| and |s_y|) and m = max(1, sum |Y'|). The terms of s, m |lse(s)| and
    <|Y'|, |s|>, are times lambda_t where lambda_t > 1.
    Gradients: g * m * (1 + |lse(z)| + |lse(s)|), where g is the row's upstream
    gradient, times lambda_t / tau for the text gradient.
    """
    vis = case.vis_logits.double().cpu()
    txt = case.txt_logits.double().cpu() / case.kwargs["tau"]
    valid = case.valid()
    y = case.smoothed_target().abs()
    mass = y.sum(1).clamp(min=1.0) if y.numel() else torch.ones(vis.shape[0])
    if vis.shape[1] == 0 or vis.shape[0] == 0:
        lse_z = lse_s = ref_abs = y_z = y_s = torch.zeros(vis.shape[0], dtype=torch.float64)
    else:
        lse_z, lse_s = vis.logsumexp(1), txt.logsumexp(1)
        p_ref = txt.softmax(1)
        ref_abs = (p_ref * vis.abs()).nan_to_num().sum(1)
        ref_vis = (p_ref * vis).nan_to_num().sum(1, keepdim=True)
        ref_abs = ref_abs + case.kwargs["lambda_v"] * (
            p_ref * txt.abs() * (vis - ref_vis).abs()).nan_to_num().sum(1)
        y_z = (y * vis.abs()).nan_to_num().sum(1)
        y_s = (y * txt.abs()).nan_to_num().sum(1)
    text_weight = max(1.0, case.kwargs["lambda_t"])  # the loss weighs CE(s, Y) by lambda_t
    loss_row = mass * (1 + lse_z.abs()) + ref_abs + y_z + text_weight * (mass * lse_s.abs() + y_s)
    grad_row = mass * (1 + lse_z.abs() + lse_s.abs())

    reduction = case.kwargs["reduction"]
    g = case.grad_out.double().abs()
    if reduction == "none":
        loss_scale, g_row = loss_row, g
    elif reduction == "sum":
        loss_scale, g_row = loss_row[valid].sum(), g.expand_as(grad_row)
    else:
        n = max(int(valid.sum()), 1)
        loss_scale, g_row = loss_row[valid].sum() / n, (g / n).expand_as(grad_row)
    grad_scale = (g_row * grad_row)[:, None]
    txt_factor = case.kwargs["lambda_t"] / case.kwargs["tau"]
    return loss_scale, grad_scale, grad_scale * txt_factor


def assert_close(actual, expected, tol, scale, what):
    """|actual - expected| <= tol.atol * scale + tol.rtol * |expected|, elementwise,
    with nan where the reference has nan; reports where and by how much. Values
    below the smallest normal number of actual's dtype cannot be told apart."""
    floor = torch.finfo(actual.dtype).tiny
    actual = actual.double()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    both_nan = torch.isnan(actual) & torch.isnan(expected)
    bound = tol.atol * scale + tol.rtol * expected.abs() + floor
    err = (actual - expected).abs()
    bad = ~both_nan & ~(err <= bound) & ~(actual == expected)  # == covers equal infinities
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0]) if bad.dim() else ()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements off; first at {list(idx)}: "
            f"fused {actual[idx].item()!r}, reference {expected[idx].item()!r}, "
            f"|diff| {err[idx].item():.3e} > bound {torch.as_tensor(bound)[idx].item():.3e}",
        )


def errors(actual, expected):
    """|actual - expected| elementwise, for `actual` in its own dtype and the float64
    truth `expected`: 0 where both are the same nan or infinity, or where the truth
    rounds to the infinity `actual` holds (it is past the dtype's largest float); inf
    where one is nan or infinite and the other is not."""
    dtype = actual.dtype
    actual = actual.double()
    diff = (actual - expected).abs()
    # Each case above leaves a nan or an infinity in diff (or a 0): only those
    # elements need a look, and they are few (the suite's large shapes spent
    # seconds on masks of every element).
    odd = ~torch.isfinite(diff)
    if odd.any():
        a, e = actual[odd], expected[odd]
        same = ((torch.isnan(a) & torch.isnan(e))
                | (torch.isinf(a) & (a == e.to(dtype).double())))
        diff[odd] = torch.where(same, 0.0, math.inf).double()
    return diff


def max_error(actual, expected):
    """The largest of errors(actual, expected)."""
    diff = errors(actual, expected)
    return diff.max().item() if diff.numel() else 0.0


def max_abs(x):
    x = x.double().abs().nan_to_num(nan=0.0, posinf=0.0)
    return x.max().item() if x.numel() else 0.0


def floor_units(case):
    """What each output (loss, grad vis_logits, grad txt_logits) is resolved in: ulps
    of (1 + lambda_t) m per row's loss (times the rows for "sum"), of g m, with g
    the largest |upstream gradient| of a row, and of g m lambda_t / tau; m is the
    largest mass of a smoothed target row, and at least 1."""
    reduction = case.kwargs["reduction"]
    valid = int(case.valid().sum())
    mass = max(1.0, max_abs(case.smoothed_target().abs().sum(1)))
    g = case.grad_out.double().abs().cpu()
    if reduction == "mean":
        g = g / max(valid, 1)
    g = max_abs(g) * mass
    loss = (1 + case.kwargs["lambda_t"]) * mass * (valid if reduction == "sum" else 1)
    return loss, g, g * case.kwargs["lambda_t"] / case.kwargs["tau"]


# The rule in float64, elementwise: FLOOR_ULPS units of float64 times each
# output's scale (scales).
FP64_RULE = Tolerance(rtol=FLOOR_ULPS * torch.finfo(torch.float64).eps,
                      atol=FLOOR_ULPS * torch.finfo(torch.float64).eps)


def rule_bounds(case, fused, exact, in_dtype):
    """For each output of `fused` (not fp64), with the fp64 truth `exact` and the
    recipe run in the inputs' dtype `in_dtype`: (the error the rule allows, the
    recipe's error, the floor)."""
    bounds = []
    for f, r, e, unit in zip(fused, in_dtype, exact, floor_units(case)):
        floor = FLOOR_ULPS * torch.finfo(f.dtype).eps * max(max_abs(e), unit)
        # In the fused output's dtype: a recipe that overflows a narrower one
        # (an fp16 loss past 65504) errs, where the fused fp32 loss need not.
        recipe_err = max_error(r.cpu().to(f.dtype), e)
        bounds.append((RULE_FACTOR * recipe_err + floor + torch.finfo(f.dtype).tiny, recipe_err,
                       floor))
    return bounds


def assert_matches_reference(case, dtype, fused, in_dtype=None, where=""):
    """The spec every kernel is held to, the rule above. `fused` is (loss, grad
    vis_logits, grad txt_logits) from a kernel run on the case cast to `dtype`;
    `in_dtype` the same outputs of the recipe run in that dtype (unused for fp64)."""
    fused = [x.cpu() for x in fused]
    exact = [x.cpu() for x in run_reference64(case, dtype)]
    names = ("loss", "grad vis_logits", "grad txt_logits")
    loss_dtype = _ops.acc_dtype(dtype)
    assert fused[0].dtype == loss_dtype, f"{dtype} inputs give a {loss_dtype} loss{where}"
    assert fused[1].dtype == fused[2].dtype == dtype, f"gradients come back in {dtype}{where}"
    if dtype == torch.float64:
        for name, f, e, scale in zip(names, fused, exact, scales(case)):
            assert_close(f, e, FP64_RULE, torch.as_tensor(scale).cpu(), f"{name} ({dtype}{where})")
        return
    for name, f, e, (allowed, recipe_err, floor) in zip(names, fused, exact,
                                                        rule_bounds(case, fused, exact, in_dtype)):
        err = max_error(f, e)
        assert err <= allowed, (
            f"{name} in {dtype}{where}: fused error {err:.3e} > {RULE_FACTOR} x recipe-in-"
            f"{dtype} error {recipe_err:.3e} + floor {floor:.3e} (largest true value "
            f"{max_abs(e):.3e})")
    for name, f, r, e, size in zip(names[1:], fused[1:], in_dtype[1:], exact[1:],
                                   gradient_sizes(case)):
        assert_elements_match(name, f, r, e, size, where)


def gradient_sizes(case):
    """[B, C] float64 for each gradient: the size of the terms each element is the
    difference of, |g| (|sum(w')| p_v + |w'|) for vis_logits and
    |g| lambda_t / tau (|sum(Y')| p_ref + |Y'|) for txt_logits, with g the row's
    upstream gradient (0 for ignored rows) and w', Y' the smoothed targets."""
    kw = case.kwargs
    batch, num_classes = case.shape
    valid = case.valid()
    eps, lambda_v = kw.get("label_smoothing", 0.0), kw["lambda_v"]
    vis = case.vis_logits.double().cpu()
    txt = case.txt_logits.double().cpu() / kw["tau"]
    p_v, p_ref = (x.softmax(1).nan_to_num() for x in (vis, txt))
    y_smoothed = case.smoothed_target()
    w = (1 - eps) * (lambda_v * p_ref + (1 - lambda_v) * case.target_rows()) + eps / max(
        num_classes, 1)
    w = torch.where(valid[:, None], w, 0.0)
    g = case.grad_out.double().abs().cpu()
    if kw["reduction"] == "none":
        g_row = g
    else:
        n = max(int(valid.sum()), 1) if kw["reduction"] == "mean" else 1
        g_row = (g / n).expand(batch)
    g_row = torch.where(valid, g_row, 0.0)[:, None]
    vis_size = g_row * (w.sum(1, keepdim=True).abs() * p_v + w.abs())
    txt_size = g_row * kw["lambda_t"] / kw["tau"] * (
        y_smoothed.sum(1, keepdim=True).abs() * p_ref + y_smoothed.abs())
    return vis_size, txt_size


def assert_elements_match(name, fused, recipe, exact, size, where=""):
    """The rule's element-wise part for one gradient (see the table above)."""
    dtype = fused.dtype
    fused, recipe = fused.cpu(), recipe.cpu()
    size = size.expand_as(exact)
    if not exact.numel():
        return
    # The power of two of each element's size; sizes of 0 (and below the smallest
    # normal) share one group.
    # The groups are numbered from the lowest power of two, not sorted.
    exponent = torch.frexp(size)[1]
    group = torch.where(size >= torch.finfo(dtype).tiny, exponent, exponent.min() - 1)
    index = (group - group.min()).long()
    recipe_err = torch.zeros(int(index.max()) + 1, dtype=torch.float64).scatter_reduce(
        0, index.flatten(), errors(recipe, exact).flatten(), "amax")[index]
    allowed = (RULE_FACTOR * recipe_err + FLOOR_ULPS * torch.finfo(dtype).eps * size
               + torch.finfo(dtype).tiny)
    err = errors(fused, exact)
    bad = ~(err <= allowed)
    if bad.any():
        i = tuple(int(k) for k in bad.nonzero()[0])
        raise AssertionError(
            f"{name} in {dtype}{where}: {int(bad.sum())} of {bad.numel()} elements err more than "
            f"{RULE_FACTOR} x the recipe's error on elements of their size + {FLOOR_ULPS} ulps; "
            f"first at {list(i)}: fused {fused[i].item()!r}, truth {exact[i].item()!r}, error "
            f"{err[i].item():.3e} > {allowed[i].item():.3e} (recipe's error on elements of size "
            f"{size[i].item():.3e}: {recipe_err[i].item():.3e})")


def check_against_reference(case, dtype, device="cpu", where=None):
    """The case through fused_tes_loss on `device`, held to the rule; `where` names
    the device in a failure's message (the device's name unless given)."""
    fused = run(fused_tes_loss, case, dtype, device)
    in_dtype = run(reference_tes_loss, case, dtype, device) if dtype != torch.float64 else None
    assert_matches_reference(case, dtype, fused, in_dtype,
                             where=f", {device if where is None else where}")
