"""Shared pieces of the test suite: the devices every property runs on, the one
tolerance table, the Hypothesis strategy that draws TeS problems, the
comparison against the reference, and the raw ops' keyword helper.

Every comparison is against ``tesloss.reference.tes_loss`` run in float64 on
the same (exactly up-cast) inputs.
"""
import dataclasses
import inspect
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import tesloss
from tesloss import _ops
from tesloss.reference import tes_loss as reference_tes_loss

# Every run of the suite draws the same examples ("ci", derandomized: no example
# database either), so a newcomer's `make test` is CI's run, and a red run is always
# reproducible. Random exploration is `make fuzz` (tests/fuzz.py), under "fuzz":
# fresh draws each run, nothing kept for the next, a failing example printed whole
# to be made a fixed test case.
settings.register_profile(
    "ci", deadline=None, max_examples=300, print_blob=True, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("fuzz", parent=settings.get_profile("ci"), derandomize=False,
                          database=None, max_examples=1000)
# For a lent GPU's short time (bench/gpu_check.sh): fewer draws, the same ones every run.
settings.register_profile("gpu", parent=settings.get_profile("ci"), max_examples=50)
settings.load_profile(os.environ.get("TESLOSS_HYPOTHESIS_PROFILE") or "ci")

# Every property runs on each of these (pytorch_scatter's `devices` list). Tests
# of what only a GPU has live in test_cuda.py; `pytest -m cuda` selects both.
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.cuda)]
                     if torch.cuda.is_available() else [])


@pytest.fixture(scope="session", params=DEVICES)
def device(request):
    """The device a property runs on, with the op's compiled kernels for it: without
    them fused_tes_loss would fall back to the reference and compare it with itself."""
    if not _ops.has_kernel(request.param):
        message = (f"tesloss._C has no {request.param} kernels "
                   f"({_ops.LOAD_ERROR or 'built without them'})")
        if _ops.extension_required():
            pytest.fail(message)
        pytest.skip(message)
    return request.param

# The one tolerance table.
#
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
# text logits). float64 has no truth more
# precise than the recipe in float64 at hand, so there the floor is FLOOR_ULPS
# units of float64 times the size of what rounding acts on (scales) instead.
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


TOLERANCES = {
    torch.float64: Tolerance(rtol=1e-12, atol=1e-12),
    torch.float32: Tolerance(rtol=1e-5, atol=1e-5),
}
# Spot checks of one fixed fp32 input (graph replay, streams, devices), where no
# conditioning scale is computed: bounds far looser than the kernels' error that
# still catch a kernel reading the wrong data.
SPOT_CHECK = {"loss": Tolerance(rtol=1e-4, atol=1e-4), "grad": Tolerance(rtol=1e-4, atol=1e-7)}
HALF_DTYPES = (torch.bfloat16, torch.float16)
ALL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
REDUCTIONS = ("mean", "sum", "none")
# The forms of target the strategy draws: class indices, probability rows that
# sum to 1, rows that do not (and have zeros), and timm's Mixup / CutMix.
TARGET_FORMS = ("index", "probs", "unnormalized", "mixup")
# Class counts that reach each CUDA launch shape (threads per row 8, 32, 128,
# 512) and the packed path's head, body and scalar rest; 20000 also reaches a
# 512-thread group's whole chunks in bf16 and fp16 (16384 columns each).
EDGE_CLASSES = (1, 7, 8, 9, 100, 1000, 1001, 4097, 9000, 20000)


@dataclasses.dataclass
class Case:
    vis_logits: torch.Tensor
    txt_logits: torch.Tensor
    target: torch.Tensor
    grad_out: torch.Tensor
    kwargs: dict

    @property
    def shape(self):
        return tuple(self.vis_logits.shape)

    @property
    def probs(self):
        """Whether the target is [B, C] class probabilities."""
        return self.target.is_floating_point()

    def valid(self):
        """[B] bool: the rows that count (all of them, for class probabilities)."""
        if self.probs:
            return torch.ones(self.target.shape[0], dtype=torch.bool)
        return self.target.cpu() != self.kwargs["ignore_index"]

    def target_rows(self):
        """[B, C] float64: Y, onehot(y) for class indices, zero for ignored rows."""
        batch, num_classes = self.shape
        if self.probs:
            y = self.target.cpu().double()
        else:
            label = torch.where(self.valid(), self.target.cpu(), 0)
            y = torch.zeros(batch, num_classes, dtype=torch.float64).scatter_(
                1, label[:, None], 1.0)
        return torch.where(self.valid()[:, None], y, 0.0)

    def smoothed_target(self):
        """[B, C] float64: Y' = (1 - eps) Y + eps / C, zero for ignored rows."""
        eps = self.kwargs.get("label_smoothing", 0.0)
        y = (1 - eps) * self.target_rows() + eps / max(self.shape[1], 1)
        return torch.where(self.valid()[:, None], y, 0.0)

    def leaves(self, dtype=None, device="cpu"):
        """Fresh leaf copies of both logits that require grad, on `device` in their
        layout (on_device), optionally cast."""
        return [on_device(x, device, dtype).requires_grad_()
                for x in (self.vis_logits, self.txt_logits)]


def draw_probs(form, target, num_classes, gen, dtype):
    """[B, C] class probabilities of the given TARGET_FORMS form, around the labels
    `target`, rounded to `dtype` (so the fused op and the fp64 truth read the same)."""
    batch = target.shape[0]
    if form == "mixup":  # timm's recipe: mixup or CutMix per batch, smoothed labels
        import numpy as np
        from timm.data import Mixup

        np.random.seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
        mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1,
                      num_classes=num_classes)
        images = torch.rand(batch, 3, 8, 8, generator=gen)
        _, y = mixup(images, target)
        y = y.double()
    else:
        y = torch.rand(batch, num_classes, generator=gen, dtype=torch.float64) ** 4
        y = y / y.sum(1, keepdim=True)
        if form == "unnormalized":  # sums in [0, 2], a third of the weights exactly 0
            y = y.masked_fill(torch.rand(y.shape, generator=gen) < 0.3, 0.0)
            y = y * 2 * torch.rand(batch, 1, generator=gen, dtype=torch.float64)
    return y.to(dtype).double()


# The edges of a parameter in [0, 1] (lambda_v, label_smoothing): 0, 1, and
# 1 - 10^-k, where 1 - lambda is formed from lambda.
UNIT_EDGES = (0.0, 1.0) + tuple(1 - 10.0**-k for k in range(1, 8))


def log_uniform(low, high):
    """Numbers 10^x for x drawn from [low, high]."""
    return st.floats(low, high).map(lambda x: 10.0**x)


@st.composite
def tes_cases(draw, dtype, max_b=64, max_c=4096, device="cpu"):
    """A TeS problem: logits, target, parameters, layout and upstream gradient."""
    # B = 0 has tests of its own; drawn here it would crowd out the rest.
    batch = draw(st.integers(1, max_b))
    # Class indices half the time; Mixup mixes a batch with its reverse, so takes
    # an even batch.
    form = draw(st.sampled_from(("index",) * 3 + TARGET_FORMS[1:]))
    if form == "mixup":
        batch += batch % 2
    label_smoothing = draw(st.one_of(st.just(0.0), st.sampled_from((0.1,) + UNIT_EDGES),
                                     st.floats(0.0, 1.0)))
    # Vector widths (8, 16) and the CPU kernel's 1024-column blocks, and past them.
    num_classes = draw(st.one_of(
        st.integers(1, 40), st.integers(1, max_c),
        st.sampled_from([c for c in (15, 16, 17, 1000, 1023, 1024, 1025, 2049, max_c)
                         if c <= max_c])))
    seed = draw(st.integers(0, 2**31 - 1))
    # Up to 1e37: the row's spread stays below the largest float, so the recipe
    # stays finite; fp16 cannot hold logits past 65504.
    vis_scale = draw(st.sampled_from([1.0, 8.0, 100.0, 1e4]
                                     + ([] if dtype == torch.float16 else [1e37])))
    # Cosine similarities lie in [-1, 1]; larger text logits are drawn too, but
    # not for fp16, whose range t / tau would leave in the reference.
    txt_scale = draw(st.sampled_from([1.0] if dtype == torch.float16 else [1.0, 1.0, 50.0]))
    # Per-row offsets, which softmax ignores: vision logits of a biased head, text
    # logits already multiplied by CLIP's logit scale.
    vis_offset = draw(st.sampled_from([0.0, 0.0, 1e4]))
    txt_offset = draw(st.sampled_from([0.0] if dtype == torch.float16 else [0.0, 0.0, 100.0]))
    # Rows where both heads are sure of the label (losses near 0, where a formula
    # that cancels goes negative), or where the label's logits are far below the
    # rest (its terms, weighed by 1 - lambda_v, 1 - eps and lambda_t, dominate).
    label_logits = draw(st.sampled_from(("anywhere", "confident", "far below")))
    very_negative = draw(st.booleans())
    tau = draw(st.one_of(st.sampled_from([1e-4, 1e-3, 2**-5, 0.03, 1.0, 10.0, 100.0]),
                         st.floats(1e-4, 100.0), log_uniform(-4, 2)))
    lambda_v = draw(st.one_of(st.sampled_from((0.1,) + UNIT_EDGES), st.floats(0.0, 1.0)))
    lambda_t = draw(st.one_of(st.sampled_from([0.0, 0.3, 1.0, 1e-7, 1e4]), st.floats(0.0, 1.0),
                              log_uniform(-7, 4)))
    reduction = draw(st.sampled_from(REDUCTIONS))
    ignore_index = draw(st.sampled_from([-100, -1, 0]))
    ignore_fraction = draw(st.sampled_from([0.0, 0.25, 1.0]))
    layout = draw(st.sampled_from(["contiguous", "row_strided", "transposed"]))
    gen = torch.Generator().manual_seed(seed)
    vis = torch.randn(batch, num_classes, generator=gen, dtype=torch.float64) * vis_scale
    txt = (torch.rand(batch, num_classes, generator=gen, dtype=torch.float64) * 2 - 1) * txt_scale
    if very_negative and num_classes > 1:
        mask = torch.rand(batch, num_classes, generator=gen) < 0.3
        vis = vis.masked_fill(mask, -1e4)
    target = torch.randint(0, num_classes, (batch,), generator=gen)
    rows = torch.arange(batch)
    if label_logits == "confident":
        vis[rows, target] = vis.amax(1) + 20
        txt[rows, target] = txt.amax(1) + 0.5
    elif label_logits == "far below":
        vis[rows, target] = vis.amin(1) - 20
        txt[rows, target] = txt.amin(1) - 0.5
    vis = vis + torch.rand(batch, 1, generator=gen, dtype=torch.float64) * vis_offset
    txt = txt + torch.rand(batch, 1, generator=gen, dtype=torch.float64) * txt_offset
    ignored = torch.rand(batch, generator=gen) < ignore_fraction
    if form == "index":
        target = torch.where(ignored, torch.full_like(target, ignore_index), target)
    else:  # probability rows are never ignored
        target = draw_probs(form, target, num_classes, gen, dtype)
    if reduction == "none":
        grad_out = torch.randn(batch, generator=gen, dtype=torch.float64)
    else:
        grad_out = torch.tensor(draw(st.sampled_from([1.0, 0.37, -2.5])), dtype=torch.float64)

    vis, txt = (_layout(x.to(dtype), layout).to(device) for x in (vis, txt))
    kwargs = dict(tau=tau, lambda_v=lambda_v, lambda_t=lambda_t, ignore_index=ignore_index,
                  reduction=reduction, label_smoothing=label_smoothing)
    return Case(vis, txt, target.to(device), grad_out.to(device), kwargs)


def _layout(x, layout):
    if layout == "row_strided":  # rows 3 elements apart beyond their length: no copy needed
        padded = torch.zeros(x.shape[0], x.shape[1] + 3, dtype=x.dtype)
        padded[:, : x.shape[1]] = x
        return padded[:, : x.shape[1]]
    if layout == "transposed":  # class stride != 1: the op makes one contiguous copy
        return x.t().contiguous().t()
    return x


def on_device(x, device, dtype=None):
    """A copy of x on `device`, cast to `dtype`, with x's strides and storage
    offset, so row-strided and misaligned rows stay that way."""
    dtype = dtype or x.dtype
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=dtype, device=device)
    extent = x.storage_offset() + sum((n - 1) * s for n, s in zip(x.shape, x.stride())) + 1
    flat = torch.zeros(extent, dtype=dtype, device=device)
    out = flat.as_strided(x.shape, x.stride(), x.storage_offset())
    out.copy_(x)
    return out.detach()  # a leaf of its own, not an autograd view of `flat`


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
    them in `dtype` (rounded to it), so that no error of the inputs counts."""
    rounded = dataclasses.replace(case, vis_logits=case.vis_logits.to(dtype),
                                  txt_logits=case.txt_logits.to(dtype))
    return run(reference_tes_loss, rounded, torch.float64)


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
    rounded = expected.to(actual.dtype)
    actual = actual.double()
    same = ((actual == expected) | (torch.isnan(actual) & torch.isnan(expected))
            | (torch.isinf(actual) & (actual == rounded.double())))
    return torch.where(same, 0.0, (actual - expected).abs().nan_to_num(nan=math.inf,
                                                                       posinf=math.inf))


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
    # The power of two of each element's size; sizes of 0 (and below the smallest
    # normal) share one group.
    group = torch.where(size >= torch.finfo(dtype).tiny, torch.frexp(size)[1], -100000)
    groups, index = torch.unique(group, return_inverse=True)
    recipe_err = torch.zeros(len(groups), dtype=torch.float64).scatter_reduce(
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


def placed(x, offset, row_stride):
    """x laid out with its first element `offset` elements into a buffer and
    rows `row_stride` apart: an offset that is not a multiple of 16 bytes
    leaves every row misaligned for 128-bit access. The padding holds 1e4, so
    a kernel that reads past a row's end gets a visibly wrong loss."""
    batch, num_classes = x.shape
    buffer = torch.full((offset + batch * row_stride,), 1e4, dtype=x.dtype)
    out = buffer.as_strided(x.shape, (row_stride, 1), offset)
    out.copy_(x)
    return out


def shifted(case, vis_offset, txt_offset, pad):
    num_classes = case.shape[1]
    return dataclasses.replace(
        case, vis_logits=placed(case.vis_logits, vis_offset, num_classes + pad),
        txt_logits=placed(case.txt_logits, txt_offset, num_classes + pad))


def draw_case(data, dtype, max_b=64, max_c=9000):
    """tes_cases, some moved to misaligned rows, vis and txt at different
    offsets (then no column can be read as a 128-bit pack of both); probability
    targets move too, in the accumulation type the kernels read them in."""
    case = data.draw(tes_cases(dtype, max_b=max_b, max_c=max_c))
    if data.draw(st.booleans()):
        case = shifted(case, data.draw(st.integers(0, 9)), data.draw(st.integers(0, 9)),
                       data.draw(st.integers(0, 9)))
        if case.probs:
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            case.target = placed(case.target.to(acc), data.draw(st.integers(0, 9)),
                                 case.shape[1] + data.draw(st.integers(0, 9)))
    return case


# Where edge_case puts its rows: (vis offset, txt offset, row padding) in elements.
ROW_LAYOUTS = {"contiguous": (0, 0, 0), "offset 1": (1, 1, 0), "offsets differ": (1, 2, 0),
               "row stride +5": (0, 0, 5)}


# The targets edge_case takes: the published recipe's, smoothed, and probability rows.
EDGE_TARGETS = ("index", "smoothed", "probs")


def edge_case(dtype, num_classes, layout, batch=37, target="index"):
    """A fixed recipe-parameter problem with every fifth row ignored, its rows
    laid out as ROW_LAYOUTS[layout] says. `target` is one of EDGE_TARGETS:
    class indices, the same with label smoothing 0.1, or probability rows
    (with smoothing 0.1), laid out like the logits."""
    gen = torch.Generator().manual_seed(num_classes)
    vis = torch.randn(batch, num_classes, generator=gen, dtype=torch.float64) * 4
    txt = torch.rand(batch, num_classes, generator=gen, dtype=torch.float64) * 2 - 1
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    labels[::5] = -100
    kwargs = dict(tau=0.03, lambda_v=0.1, lambda_t=0.3, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0 if target == "index" else 0.1)
    if target == "probs":
        labels = draw_probs("unnormalized", labels.clamp(min=0), num_classes, gen, dtype)
    case = Case(vis.to(dtype), txt.to(dtype), labels, torch.tensor(0.37, dtype=torch.float64),
                kwargs)
    vis_offset, txt_offset, pad = ROW_LAYOUTS[layout]
    case = shifted(case, vis_offset, txt_offset, pad)
    if target == "probs":  # the kernels read it in the accumulation type
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        case.target = placed(case.target.to(acc), vis_offset, num_classes + pad)
    return case


def subnormal_weights_case(dtype, which):
    """Two random draws' failures (make fuzz, 2026-12-03), where a weight below
    2^-126 flushed to 0 lost an element that its factor makes a normal float.
    "text": text logits 95 apart at tau = 1 give p_ref = 3e-42, which
    lambda_t / tau = 1e4 brings back to 4e-38 in the text gradient (fp32).
    "vision": a vision logit 87.5 below its row's max gives p_v = 1e-38, which
    an upstream gradient of -2.5 makes -2.5e-38 in the vision gradient (bf16)."""
    if which == "text":
        vis = [[-2.3104, -0.3733, -1.2609, -0.7270, -0.0200, 0.2103],
               [0.1772, -0.8305, 0.2387, 0.7335, -0.7730, -1.5952],
               [-0.6870, 1.4881, -0.4484, -0.8910, 0.6749, 1.0469]]
        txt = [[-1.8493, 41.7506, 7.2040, -1.9171, 29.6059, -13.2030],
               [-22.7816, -45.8561, 24.8688, -15.8244, 3.8225, -3.3635],
               [36.3486, -45.8941, 49.7260, 37.9664, 26.2997, -24.4100]]
        return Case(torch.tensor(vis).to(dtype), torch.tensor(txt).to(dtype),
                    torch.tensor([2, 0, 0]),
                    torch.tensor([0.5693, 0.1782, 1.3549], dtype=torch.float64),
                    dict(tau=1.0, lambda_v=0.1, lambda_t=1e4, ignore_index=-100,
                         reduction="none", label_smoothing=0.0))
    vis = [[-26.25, 30.875, 104.5, -71.5, -222.0, 23.5, 159.0, 27.75, -167.0, 67.5, -138.0,
            -24.75, -20.5, -43.0, 67.5, -137.0],
           [46.0, 72.5, 141.0, 69.5, 92.5, 160.0, -63.0, 131.0, -50.0, 93.0, -228.0, 13.9375,
            -61.0, 41.75, -133.0, 64.5]]
    txt = [[0.5195, 0.7461, 0.4277, 0.6953, 0.2012, 0.2217, -0.4062, 0.8438, 0.2949, 0.9961,
            -0.2383, 0.4453, 0.6367, 0.0298, -0.9531, 0.8750],
           [0.9062, 0.4023, -0.6367, -0.1250, 0.3594, -0.8633, 0.9805, -0.5586, -0.1030,
            0.5625, 0.8203, 0.3457, -0.4199, 0.4277, 0.6562, -0.4512]]
    return Case(torch.tensor(vis).to(dtype), torch.tensor(txt).to(dtype), torch.tensor([8, 15]),
                torch.tensor(-2.5, dtype=torch.float64),
                dict(tau=1e-4, lambda_v=0.1, lambda_t=0.0, ignore_index=-100, reduction="sum",
                     label_smoothing=0.0))


def check_against_reference(case, dtype, device):
    """The case through fused_tes_loss on `device`, held to the spec."""
    fused = run(tesloss.fused_tes_loss, case, dtype, device)
    in_dtype = run(reference_tes_loss, case, dtype, device) if dtype != torch.float64 else None
    assert_matches_reference(case, dtype, fused, in_dtype, where=f", {device}")


# fused_tes_loss's parameters with their defaults (the published recipe).
RECIPE = {name: p.default for name, p in inspect.signature(tesloss.fused_tes_loss).parameters.items()
          if p.kind == p.KEYWORD_ONLY and name != "return_parts"}


def raw_params(**kwargs):
    """The raw ops' scalar arguments, by name, from fused_tes_loss's keywords:
    the recipe's where not given, and a reduction name as the op's code (an int
    reduction is passed as it is)."""
    params = {**RECIPE, **kwargs}
    if isinstance(params["reduction"], str):
        params["reduction"] = _ops.REDUCTIONS[params["reduction"]]
    return params


def raw_forward(vis_logits, txt_logits, target, **kwargs):
    """torch.ops.tesloss.tes_loss_forward with fused_tes_loss's keywords."""
    return torch.ops.tesloss.tes_loss_forward(vis_logits, txt_logits, target,
                                              **raw_params(**kwargs))


def raw_backward(grad_loss, vis_logits, txt_logits, target, row_stats, batch_stats, **kwargs):
    """torch.ops.tesloss.tes_loss_backward with fused_tes_loss's keywords."""
    return torch.ops.tesloss.tes_loss_backward(grad_loss, vis_logits, txt_logits, target,
                                               row_stats, batch_stats, **raw_params(**kwargs))
