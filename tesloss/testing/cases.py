"""TeS problems to hold a kernel to the rule with (tesloss.testing.rule): the Case
(logits, target, parameters, upstream gradient, and the rows' layout in memory),
build_case, which makes one from a random draw's choices, and edge_case, the
fixed problems that reach each kernel path in each row layout.
"""
import dataclasses

import torch

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
    # (dtype, draws) for a case build_case made: a failing random draw prints
    # as the entry FOUND_BY_FUZZ takes, not as its tensors.
    drawn: tuple = None

    def __repr__(self):
        if self.drawn is None:
            return f"Case(shape={self.shape}, probs={self.probs}, kwargs={self.kwargs})"
        dtype, drawn = self.drawn
        draws = ", ".join(f"{k}={v!r}" for k, v in drawn.items())
        return f"FOUND_BY_FUZZ entry: ({dtype}, dict({draws}))"

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


def build_case(dtype, device="cpu", *, batch, form, num_classes, seed, vis_scale, txt_scale,
               vis_offset, txt_offset, label_logits, very_negative, ignore_fraction, layout,
               grad_scale, **kwargs):
    """The case tests/cases.py's tes_cases draws, from what it drew: regimes.FOUND_BY_FUZZ
    names the draws a random exploration failed on."""
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
        target = torch.where(ignored, torch.full_like(target, kwargs["ignore_index"]), target)
    else:  # probability rows are never ignored
        target = draw_probs(form, target, num_classes, gen, dtype)
    if kwargs["reduction"] == "none":
        grad_out = torch.randn(batch, generator=gen, dtype=torch.float64)
    else:
        grad_out = torch.tensor(grad_scale, dtype=torch.float64)

    vis, txt = (_layout(x.to(dtype), layout).to(device) for x in (vis, txt))
    drawn = dict(batch=batch, form=form, num_classes=num_classes, seed=seed, vis_scale=vis_scale,
                 txt_scale=txt_scale, vis_offset=vis_offset, txt_offset=txt_offset,
                 label_logits=label_logits, very_negative=very_negative,
                 ignore_fraction=ignore_fraction, layout=layout, grad_scale=grad_scale, **kwargs)
    return Case(vis, txt, target.to(device), grad_out.to(device), kwargs, (dtype, drawn))


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
