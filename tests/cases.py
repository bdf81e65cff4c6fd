"""The Hypothesis strategy that draws TeS problems (tes_cases, draw_case). What
it draws is made a case by tesloss.testing's build_case, so a failing draw is
one line in tesloss.testing.regimes.FOUND_BY_FUZZ.
"""
import torch
from hypothesis import strategies as st

from tesloss.testing.cases import REDUCTIONS, TARGET_FORMS, build_case, placed, shifted

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
    grad_scale = None if reduction == "none" else draw(st.sampled_from([1.0, 0.37, -2.5]))
    return build_case(dtype, device, batch=batch, form=form, num_classes=num_classes, seed=seed,
                      vis_scale=vis_scale, txt_scale=txt_scale, vis_offset=vis_offset,
                      txt_offset=txt_offset, label_logits=label_logits,
                      very_negative=very_negative, ignore_fraction=ignore_fraction,
                      layout=layout, grad_scale=grad_scale, tau=tau, lambda_v=lambda_v,
                      lambda_t=lambda_t, ignore_index=ignore_index, reduction=reduction,
                      label_smoothing=label_smoothing)


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
