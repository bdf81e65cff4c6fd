"""The float64 truth's values in extended precision: the recipe's closed form
in numpy's long double.

The recipe run in float64 is no truth for float64 kernels: its sums of C
terms err by up to about C / lanes half-ulps, and the lanes are ATen's (4 for
AVX2, 8 for AVX-512), so at C = 20000 its gradient erred 9.2e-15 where the
rule allows 4.9e-15, on an AVX2 machine only, and the kernel's 3e-17 (2026-12-05).
Where long double is wider than double (x86's 80 bits, aarch64 Linux's 128),
every finite value of the truth comes from here; elsewhere (macOS on arm64)
the recipe in float64 stays the truth.
"""
import inspect

import torch

from ..reference import tes_loss as reference_tes_loss

try:
    import numpy as np
except ImportError:  # numpy is a test dependency, not the package's
    np = None

WIDER = np is not None and np.finfo(np.longdouble).eps < np.finfo(np.float64).eps / 2


# The recipe's own defaults, for the arguments a case leaves out.
_DEFAULTS = {name: parameter.default
             for name, parameter in inspect.signature(reference_tes_loss).parameters.items()
             if parameter.kind is parameter.KEYWORD_ONLY}


def _softmax_parts(x):
    """log_softmax and softmax of each row of x, in long double."""
    top = x.max(axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0)
    log_sum = np.log(np.exp(x - top).sum(axis=1, keepdims=True))
    log_p = x - top - log_sum
    return log_p, np.exp(log_p)


def _cross_entropy(weights, log_p):
    """-sum_c w_c log_p_c per row, a weight of 0 adding 0 (against -inf too)."""
    return -np.where(weights != 0, weights * log_p, 0).sum(axis=1)


def closed_form(case, dtype):
    """(loss, grad vis_logits, grad txt_logits) of the case's logits rounded to
    `dtype`, in long double, rounded to float64 once; the upstream gradient is
    case.grad_out. CE_eps(x, w) = -sum_c ((1 - eps) w_c + eps / C) log_softmax(x)_c;
    its gradient is sum(w') softmax(x) - w' for w' = (1 - eps) w + eps / C."""
    kw = {**_DEFAULTS, **case.kwargs}
    long = np.longdouble
    batch, num_classes = case.shape
    z = case.vis_logits.to(dtype).double().cpu().numpy().astype(long)
    s = case.txt_logits.to(dtype).double().cpu().numpy().astype(long) / long(kw["tau"])
    valid = case.valid().numpy()
    y = case.target_rows().numpy().astype(long)
    eps, lambda_v, lambda_t = (long(kw[k]) for k in ("label_smoothing", "lambda_v", "lambda_t"))
    uniform = eps / long(max(num_classes, 1))
    log_p_vis, p_vis = _softmax_parts(z)
    log_p_ref, p_ref = _softmax_parts(s)
    q = lambda_v * p_ref + (1 - lambda_v) * y
    w_vis = (1 - eps) * q + uniform
    w_txt = (1 - eps) * y + uniform
    rows = _cross_entropy(w_vis, log_p_vis) + lambda_t * _cross_entropy(w_txt, log_p_ref)
    rows = np.where(valid, rows, 0)
    g = case.grad_out.double().cpu().numpy().astype(long)
    num_valid = long(valid.sum())
    if kw["reduction"] == "none":
        loss, g_row = rows, g
    elif kw["reduction"] == "sum":
        loss, g_row = rows.sum(), np.full(batch, g)
    else:
        loss, g_row = rows.sum() / num_valid, np.full(batch, g / num_valid)
    g_row = np.where(valid, g_row, 0)[:, None]
    grad_vis = g_row * (w_vis.sum(axis=1, keepdims=True) * p_vis - w_vis)
    grad_txt = (g_row * (lambda_t / long(kw["tau"]))
                * (w_txt.sum(axis=1, keepdims=True) * p_ref - w_txt))
    return tuple(torch.from_numpy(np.asarray(x, dtype=np.float64))
                 for x in (loss, grad_vis, grad_txt))


def refined(case, dtype, recipe):
    """The recipe's float64 outputs with each value that both it and the closed
    form give finite taken from the closed form; non-finite values (nan, an
    overflow, a masked class's convention) stay the recipe's."""
    if not WIDER or case.vis_logits.numel() == 0:
        return recipe
    with np.errstate(all="ignore"):
        extended = closed_form(case, dtype)
    return tuple(torch.where(torch.isfinite(r) & torch.isfinite(e), e, r)
                 for r, e in zip(recipe, extended))
