#!/usr/bin/env python
"""How accurate fused_tes_loss is where fused losses usually break, next to the recipe.

For each regime it prints the fused op's error against a float64 truth beside the error
of the recipe (tesloss.reference.tes_loss) computed in the same dtype with plain torch
ops; "ratio" is fused / recipe (the tests require <= 2, or a few ulps). Regimes: long
batch sums, confident rows, shifted logits, small tau with saturated text rows, huge
logits. It then reports the behaviours that are not a number: double backward, bad
arguments, and the fallback's dtypes.

    python bench/bench_numerics.py            # the default set, a minute on 2 cores
    python bench/bench_numerics.py --quick    # skips the 25-million-row batch
"""
import argparse
import math
import warnings

import torch
import torch.nn.functional as F

import tesloss
from tesloss.reference import tes_loss as recipe

TRUTH = torch.float64


def error(x, truth):
    """The worst row's max |x - truth| / max |truth| (absolute where the truth is 0): rows
    are separate problems. A nan or inf where the truth is finite is inf."""
    rows = x.shape[0] if x.dim() else 1
    x, truth = (v.detach().double().reshape(rows, -1) for v in (x, truth))
    same = (x == truth) | (x.isnan() & truth.isnan())
    diff = torch.where(same, 0.0, (x - truth).abs().nan_to_num(nan=math.inf, posinf=math.inf))
    diff, scale = diff.amax(1), truth.abs().amax(1)
    tiny = torch.finfo(torch.float32).tiny  # below it a truth counts as 0
    return torch.where(scale > tiny, diff / scale, diff).max().item()


def outputs(fn, vis, txt, target, dtype, grads=True, **kwargs):
    vis = vis.detach().to(dtype).clone().requires_grad_(grads)
    txt = txt.detach().to(dtype).clone().requires_grad_(grads)
    loss = fn(vis, txt, target, **kwargs)
    if not grads:
        return (loss.detach(),)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), vis.grad, txt.grad


def compare(name, vis, txt, target, dtype=torch.float32, grads=True, **kwargs):
    truth = outputs(recipe, vis, txt, target, TRUTH, grads, **kwargs)
    fused = outputs(tesloss.fused_tes_loss, vis, txt, target, dtype, grads, **kwargs)
    plain = outputs(recipe, vis, txt, target, dtype, grads, **kwargs)
    labels = ("loss", "grad_vis", "grad_txt")
    for label, f, p, t in zip(labels, fused, plain, truth):
        ef, ep = error(f, t), error(p, t)
        ratio = ef / ep if ep > 0 else (0.0 if ef == 0 else math.inf)
        print(f"  {name:<44} {str(dtype)[6:]:<8} {label:<8} fused {ef:9.2e}  "
              f"recipe {ep:9.2e}  ratio {ratio:8.2f}")


def random_logits(batch, num_classes, seed=0, vis_scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    vis = torch.randn(batch, num_classes, generator=gen, dtype=TRUTH) * vis_scale
    txt = torch.rand(batch, num_classes, generator=gen, dtype=TRUTH) * 2 - 1
    target = torch.randint(0, num_classes, (batch,), generator=gen)
    return vis, txt, target


def batch_sums(quick):
    print("batch sums (reduction mean)")
    for batch, num_classes in ((16384, 1000), (65536, 2), (2**20, 2)):
        compare(f"B={batch}, C={num_classes}", *random_logits(batch, num_classes), grads=False)
    if not quick:  # identical rows: the truth is one row's loss
        batch = 2**24 + 2**23
        vis = torch.zeros(batch, 2, dtype=torch.float32)
        target = torch.zeros(batch, dtype=torch.long)
        row = recipe(vis[:1].double(), vis[:1].double(), target[:1]).item()
        got = tesloss.fused_tes_loss(vis, vis, target).item()
        print(f"  {'B=2^24+2^23 equal rows, C=2':<44} float32  loss     fused {got:.7f} "
              f"truth {row:.7f}  error {abs(got - row) / row:.2e}")


def confident_rows():
    print("confident rows")
    vis, txt, y = torch.tensor([[100.0, 0.0]]), torch.tensor([[0.9, 0.0]]), torch.tensor([0])
    got = tesloss.fused_tes_loss(vis, txt, y, lambda_v=0.0, lambda_t=1.0).item()
    truth = recipe(vis.double(), txt.double(), y, lambda_v=0.0, lambda_t=1.0).item()
    print(f"  vis=[[100,0]], txt=[[0.9,0]]: fused {got:.3e}, truth {truth:.3e}")
    vis, txt, y = random_logits(4096, 100, seed=1)
    vis[torch.arange(4096), y] += 40  # the vision head is sure of the label
    txt = txt.clamp(max=0.1)  # and so is the text head: s_y - s_c >= 0.8 / tau = 27
    txt[torch.arange(4096), y] = 0.9
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        rows = tesloss.fused_tes_loss(vis.to(dtype), txt.to(dtype), y, reduction="none")
        print(f"  4096 confident rows, {str(dtype)[6:]:<8}: {int((rows < 0).sum())} rows < 0, "
              f"min {rows.min().item():.2e}")
    compare("4096 confident rows", vis, txt, y, reduction="none")


def shifted_logits():
    print("shifted logits")
    vis = torch.tensor([[1e4, 1e4 - 1]])
    y = torch.tensor([0])
    got = tesloss.fused_tes_loss(vis, vis, y, lambda_v=0.0, lambda_t=0.0).item()
    print(f"  vis=[[1e4, 1e4-1]], lambdas 0: fused {got:.5f}, "
          f"F.cross_entropy {F.cross_entropy(vis, y).item():.5f}, "
          f"truth {F.cross_entropy(vis.double(), y).item():.5f}")
    vis, txt, y = random_logits(512, 1000, seed=2)
    gen = torch.Generator().manual_seed(3)
    compare("vis row offsets up to 1e4", vis + torch.rand(512, 1, generator=gen,
                                                          dtype=TRUTH) * 1e4, txt, y)
    for tau in (0.03, 2**-5):
        compare(f"txt row offsets up to 100, tau={tau}", vis,
                txt + torch.rand(512, 1, generator=gen, dtype=TRUTH) * 100, y, tau=tau)


def small_tau():
    print("small tau, saturated text rows (the text argmax is the label)")
    vis, txt, y = random_logits(64, 100, seed=4)
    txt = txt.clamp(max=0.9)
    txt[torch.arange(64), y] = 1.0
    for tau in (1e-3, 1e-4):
        compare(f"tau={tau}", vis, txt, y, tau=tau)
    print("  tied text logits, vis=[[20, 0]], txt=[[0.3, 0.3]], lambda_v=0, lambda_t=1:")
    vis, txt, y = torch.tensor([[20.0, 0.0]]), torch.tensor([[0.3, 0.3]]), torch.tensor([0])
    for tau in (1e-9, 1e-30):
        v, t = vis.clone().requires_grad_(), txt.clone().requires_grad_()
        loss = tesloss.fused_tes_loss(v, t, y, tau=tau, lambda_v=0.0, lambda_t=1.0)
        loss.backward()
        print(f"  tau={tau}: fused loss {loss.item():.4f} (truth {math.log(2) + 2.1e-9:.4f}), "
              f"grad_txt {t.grad[0, 0].item():.3e} (truth {-0.5 / tau:.3e})")


def huge_logits():
    print("huge logits")
    vis, txt, y = random_logits(64, 100, seed=5)
    compare("vis uniform in [0, 1e38], reduction none", vis.abs() / vis.abs().max() * 1e38, txt,
            y, reduction="none")
    big = torch.finfo(torch.bfloat16).max
    vis_b = (vis.abs() / vis.abs().max() * big).to(torch.bfloat16).double()
    compare("bf16 vis up to bf16's max, reduction none", vis_b, txt, y, dtype=torch.bfloat16,
            reduction="none")


def behaviours():
    print("double backward")
    vis, txt, y = random_logits(4, 5, seed=6)
    vis.requires_grad_()
    try:
        ok = torch.autograd.gradgradcheck(
            lambda v: tesloss.fused_tes_loss(v, txt, y), (vis,), raise_exception=False)
        print(f"  gradgradcheck (fp64, vis): {'passes' if ok else 'FAILS'}")
    except Exception as error:  # noqa: BLE001 - what it raises is the figure
        print(f"  gradgradcheck raises {type(error).__name__}: {str(error)[:100]}")
    print("bad arguments")
    vis, txt, y = random_logits(2, 3)
    for kwargs in (dict(tau=10**400), dict(lambda_t=10**400), dict(reduction=["mean"]),
                   dict(tau=1e-40)):
        try:
            tesloss.fused_tes_loss(vis.float(), txt.float(), y, **kwargs)
            print(f"  {kwargs!s:<24} no error")
        except Exception as error:  # noqa: BLE001
            print(f"  {str(kwargs)[:24]:<24} {type(error).__name__}: {str(error)[:90]}")
    try:
        loss, _, _ = torch.ops.tesloss.tes_loss_forward(vis, txt, y, 0.03, 5.0, 0.3, -100, 1)
        print(f"  raw op, lambda_v=5: returns {loss.item():.3f}")
    except Exception as error:  # noqa: BLE001
        print(f"  raw op, lambda_v=5: {type(error).__name__}: {str(error)[:80]}")
    print("fallback (the reference path the op takes without compiled kernels)")
    from tesloss import functional
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        v = vis.to(torch.bfloat16).requires_grad_()
        kwargs = dict(tau=0.03, lambda_v=0.1, lambda_t=0.3, ignore_index=-100,
                      reduction="mean", return_parts=False)
        loss = functional._fallback(v, txt.to(torch.bfloat16), y, **kwargs)
        print(f"  bf16 logits: loss dtype {loss.dtype}")
        nan_vis = vis.clone()
        nan_vis[1] = math.nan
        v = nan_vis.requires_grad_()
        functional._fallback(v, txt, torch.tensor([0, -100]), **kwargs).backward()
        print(f"  nan logits in an ignored row: its gradient has "
              f"{int(v.grad[1].isnan().sum())} nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip the 25-million-row batch")
    args = parser.parse_args()
    torch.manual_seed(0)
    info = tesloss.backend_info()
    print(f"tesloss {tesloss.__version__}, torch {torch.__version__}, cpu kernels "
          f"{info['cpu_capability']}; errors are max|x - x64| / max|x64|")
    batch_sums(args.quick)
    confident_rows()
    shifted_logits()
    small_tau()
    huge_logits()
    behaviours()


if __name__ == "__main__":
    main()
