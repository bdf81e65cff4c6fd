"""The correctness sweep of ``python -m tesloss.check``: named cases that, held
to the rule, cover every dtype, kind of target and reduction, ignored rows,
misaligned and strided rows, the class counts that reach each kernel path and
launch shape, and the hard regimes. Each case is built when it runs, so the
sweep holds one in memory at a time.
"""
import dataclasses
import itertools

import torch

from .cases import EDGE_CLASSES, EDGE_TARGETS, REDUCTIONS, ROW_LAYOUTS, build_case, edge_case
from .regimes import (FOUND_BY_FUZZ, PARAMETER_EDGES, confident, label_far_below, offset,
                      parameter_edge_case, problem, subnormal_weights_case)
from .rule import ALL_DTYPES


@dataclasses.dataclass(frozen=True)
class SweepCase:
    name: str
    dtype: torch.dtype
    build: callable  # () -> Case


def with_reduction(case, reduction):
    """The case with another reduction, and an upstream gradient to fit it: one per
    row, of both signs, for "none"."""
    grad_out = (torch.linspace(-1.5, 2.0, case.shape[0], dtype=torch.float64)
                if reduction == "none" else torch.tensor(0.37, dtype=torch.float64))
    return dataclasses.replace(case, grad_out=grad_out,
                               kwargs={**case.kwargs, "reduction": reduction})


def _kernel_paths():
    """Every dtype x target kind x class count, each in a row layout and a
    reduction that turn with it, every fifth row ignored (edge_case)."""
    layouts, reductions = itertools.cycle(ROW_LAYOUTS), itertools.cycle(REDUCTIONS)
    for dtype, target, num_classes in itertools.product(ALL_DTYPES, EDGE_TARGETS, EDGE_CLASSES):
        layout, reduction = next(layouts), next(reductions)
        yield SweepCase(
            f"C={num_classes} {target} target, {layout} rows, reduction {reduction}", dtype,
            lambda d=dtype, c=num_classes, lay=layout, t=target, r=reduction:
                with_reduction(edge_case(d, c, lay, target=t), r))


# The hard regimes beyond the parameters' edges: (name, dtypes, builder).
_REGIMES = [
    ("confident and ordinary rows", ALL_DTYPES,
     lambda: confident(problem(512, 100, seed=2, reduction="none"), every=2)),
    ("labels far below the rest", ALL_DTYPES, lambda: label_far_below(problem(64, 300, seed=14))),
    ("vision logits shifted by 1e4", (torch.float64, torch.float32),
     lambda: offset(problem(64, 1000, seed=3), vis_offset=1e4)),
    ("text logits shifted by 100", (torch.float64, torch.float32),
     lambda: offset(problem(64, 1000, seed=4), txt_offset=100.0)),
    ("tau 1e-4", (torch.float64, torch.float32, torch.bfloat16),
     lambda: problem(64, 1000, seed=5, tau=1e-4)),
    ("vision logits near 1e37", (torch.float64, torch.float32, torch.bfloat16),
     lambda: problem(16, 100, seed=6, vis_scale=3e36)),
    ("a large batch: 70000 x 10", (torch.float32,), lambda: problem(70_000, 10, seed=7)),
    ("long rows: 16 x 131072", (torch.float32, torch.bfloat16),
     lambda: problem(16, 131072, seed=8)),
]


def sweep():
    """Every SweepCase, in the order they run."""
    yield from _kernel_paths()
    for edge, target, dtype in itertools.product(PARAMETER_EDGES, ("index", "probs"), ALL_DTYPES):
        yield SweepCase(f"parameters at their edges: {edge}, {target} target", dtype,
                        lambda e=edge, t=target, d=dtype: parameter_edge_case(e, d, t))
    for name, dtypes, build in _REGIMES:
        for dtype in dtypes:
            yield SweepCase(name, dtype, build)
    for which, dtype in itertools.product(("text", "vision"), (torch.float32, torch.bfloat16)):
        yield SweepCase(f"subnormal {which} weights", dtype,
                        lambda w=which, d=dtype: subnormal_weights_case(d, w))
    for found, (dtype, drawn) in FOUND_BY_FUZZ.items():
        yield SweepCase(f"found by random draws: {found}", dtype,
                        lambda d=dtype, kw=drawn: build_case(d, **kw))


__all__ = ["SweepCase", "sweep", "with_reduction"]
