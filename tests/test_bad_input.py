"""Every bad input gets an error naming the argument, what was expected and what came."""
import math

import pytest
import torch
from conftest import raw_backward, raw_forward
from emulated_cuda import runs_cuda_kernels

import tesloss


def good(b=4, c=10, device="cpu"):
    return (torch.randn(b, c, device=device), torch.randn(b, c, device=device),
            torch.tensor([0, 3, 9, -100], device=device)[:b])


def call(vis=None, txt=None, target=None, **kwargs):
    v, t, y = good()
    return tesloss.fused_tes_loss(v if vis is None else vis, t if txt is None else txt,
                                  y if target is None else target, **kwargs)


def in_this_process(device):
    """A device-side assert leaves a GPU's CUDA context unusable: there, test_cuda.py
    runs a bad label in a child process. The emulated CUDA kernels raise it here."""
    if device == "cuda":
        pytest.skip("a device-side assert ends the CUDA context; test_cuda.py's "
                    "test_out_of_range_labels_trigger_a_device_side_assert runs it in a child")


@pytest.mark.parametrize("label, words", [(10, "target[1] = 10"), (11, "target[1] = 11"),
                                          (-1, "target[1] = -1"), (-101, "target[1] = -101")])
def test_labels_out_of_range(device, label, words):
    in_this_process(device)
    vis, txt, _ = good(device=device)
    target = torch.tensor([0, label, 2, 3], device=device)
    if runs_cuda_kernels(device):  # the kernels check each label as they read it
        with pytest.raises(RuntimeError, match=r"device-side assert triggered: `ignored \|\| valid`"):
            tesloss.fused_tes_loss(vis, txt, target)
        return
    with pytest.raises(IndexError, match=r"fused_tes_loss: .*") as info:
        tesloss.fused_tes_loss(vis, txt, target)
    assert words in str(info.value)
    assert "[0, 10)" in str(info.value) and "ignore_index (-100)" in str(info.value)


@pytest.mark.parametrize("label", [10, -1])
def test_the_backward_checks_the_labels_it_is_given(device, label):
    in_this_process(device)
    vis, txt, target = good(device=device)
    loss, row_stats, batch_stats = raw_forward(vis, txt, target)
    bad = target.clone()
    bad[1] = label
    error = (RuntimeError, r"device-side assert triggered: .*is_valid_label")
    if not runs_cuda_kernels(device):
        error = (IndexError, rf"target\[1\] = {label} is out of range")
    with pytest.raises(error[0], match=error[1]):
        raw_backward(torch.ones_like(loss), vis, txt, bad, row_stats, batch_stats)


def test_a_label_equal_to_a_custom_ignore_index_is_fine(device):
    vis, txt, _ = good(device=device)
    target = torch.tensor([0, -1, 2, 3], device=device)
    loss = tesloss.fused_tes_loss(vis, txt, target, ignore_index=-1, reduction="none")
    assert loss[1] == 0 and loss[[0, 2, 3]].gt(0).all()


FORMS = ("int64 class indices of shape [B]=[4] or floating-point class probabilities of "
         "shape [B, C]=[4, 10]")


@pytest.mark.parametrize("target, error, words", [
    ([0, 1, 2, 3], TypeError, f"target must be a torch.Tensor of {FORMS}, got list"),
    (torch.tensor([0.0, 1.0, 2.0, 3.0]), TypeError,
     "a target of shape [B] must hold int64 class indices, got float32 of shape [4] "
     "(class probabilities are [B, C]=[4, 10])"),
    (torch.tensor([0, 1, 2, 3], dtype=torch.int32), TypeError,
     f"target must be {FORMS}, got int32 of shape [4]"),
    (torch.zeros(4, 1, dtype=torch.long), ValueError,
     f"target must be {FORMS}, got int64 of shape [4, 1]"),
    (torch.zeros(5, dtype=torch.long), ValueError,
     f"target must be {FORMS}, got int64 of shape [5]"),
    (torch.rand(4, 9), ValueError, f"target must be {FORMS}, got float32 of shape [4, 9]"),
    (torch.rand(5, 10), ValueError, f"target must be {FORMS}, got float32 of shape [5, 10]"),
    (torch.rand(4, 10, 1), ValueError, f"target must be {FORMS}, got float32 of shape [4, 10, 1]"),
    (torch.rand(4, 10, requires_grad=True), ValueError, "target must not require grad"),
    (torch.zeros(4, 10, dtype=torch.bool), TypeError, f"target must be {FORMS}, got bool"),
])
def test_bad_targets(target, error, words):
    with pytest.raises(error) as info:
        call(target=target)
    assert "fused_tes_loss: " + words in str(info.value)


@pytest.mark.parametrize("which", ["vis_logits", "txt_logits"])
@pytest.mark.parametrize("bad, error, words", [
    (torch.randn(4), ValueError, "must be 2-D [B, C], got shape [4]"),
    (torch.randn(4, 10, 1), ValueError, "must be 2-D [B, C], got shape [4, 10, 1]"),
    (torch.ones(4, 10, dtype=torch.long), TypeError, "must be floating point, got torch.int64"),
    ([[0.0] * 10] * 4, TypeError, "must be a torch.Tensor of shape [B, C], got list"),
])
def test_bad_logits(which, bad, error, words):
    with pytest.raises(error) as info:
        call(**{which[:3]: bad})
    assert f"fused_tes_loss: {which} {words}" in str(info.value)


def test_zero_classes():
    with pytest.raises(ValueError, match=r"vis_logits must have C >= 1 classes, got shape \[4, 0\]"):
        tesloss.fused_tes_loss(torch.randn(4, 0), torch.randn(4, 0), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("which", ["vis", "txt", "target"])
def test_tensors_on_different_devices(which):
    # The meta device stands in for a GPU here: a check that only compared
    # CPU and CUDA tensors would let it through.
    v, t, y = good()
    moved = {"vis": v, "txt": t, "target": y}[which].to("meta")
    with pytest.raises(ValueError, match=r"fused_tes_loss: vis_logits, txt_logits and target "
                                         r"must be on one device, got .*meta"):
        call(**{which: moved})


def test_shape_mismatch():
    with pytest.raises(ValueError, match=r"txt_logits must have the shape of vis_logits "
                                         r"\[4, 10\], got \[4, 11\]"):
        call(txt=torch.randn(4, 11))


BAD_PARAMETERS = [
    ("tau", 0.0, ValueError, "tau must be a finite number > 0, got 0.0"),
    ("tau", -0.5, ValueError, "got -0.5"),
    ("tau", math.nan, ValueError, "got nan"),
    ("tau", math.inf, ValueError, "got inf"),
    ("tau", torch.tensor(0.03), TypeError, "tau must be a finite number > 0 (a Python number), "
                                           "got Tensor"),
    ("tau", None, TypeError, "got NoneType"),
    ("lambda_v", -0.1, ValueError, "lambda_v must be a number in [0, 1], got -0.1"),
    ("lambda_v", 1.5, ValueError, "got 1.5"),
    ("lambda_v", math.nan, ValueError, "got nan"),
    ("lambda_t", -1.0, ValueError, "lambda_t must be a finite number >= 0, got -1.0"),
    ("lambda_t", math.nan, ValueError, "got nan"),
    ("lambda_t", math.inf, ValueError, "got inf"),
    ("label_smoothing", -0.1, ValueError, "label_smoothing must be a number in [0, 1], got -0.1"),
    ("label_smoothing", 1.01, ValueError, "got 1.01"),
    ("label_smoothing", math.nan, ValueError, "got nan"),
    ("label_smoothing", torch.tensor(0.1), TypeError,
     "label_smoothing must be a number in [0, 1] (a Python number), got Tensor"),
    ("label_smoothing", "0.1", TypeError, "got str"),
    ("ignore_index", 1.5, TypeError, "ignore_index must be an int, got 1.5"),
    ("reduction", "avg", ValueError, "reduction must be one of ['none', 'mean', 'sum'], "
                                     "got 'avg'"),
    ("reduction", ["mean"], ValueError, "got ['mean']"),
    # Past float's range: named, not an OverflowError from float().
    ("tau", 10**400, ValueError, "tau must be a finite number > 0, got 1000000000"),
    ("lambda_v", 10**400, ValueError, "lambda_v must be a number in [0, 1], got 1000000000"),
    ("lambda_t", 10**400, ValueError, "lambda_t must be a finite number >= 0, got 1000000000"),
    ("lambda_t", -10**400, ValueError, "got -1000000000"),
    # 1 / tau must be finite in the accumulation type (fp32 here).
    ("tau", 1e-39, ValueError, "tau must be at least 4.2397e-39 for torch.float32 logits "
                               "(1 / tau must be finite in torch.float32), got 1e-39"),
]


@pytest.mark.parametrize("name, value, error, words", BAD_PARAMETERS)
def test_bad_parameters(name, value, error, words):
    with pytest.raises(error) as info:
        call(**{name: value})
    assert "fused_tes_loss: " in str(info.value) and words in str(info.value)


# The values among BAD_PARAMETERS that the raw ops can be given (Python numbers of
# the schema's types): the compiled op's own table must refuse each of them too.
RAW_BAD_VALUES = [(name, value) for name, value, error, _ in BAD_PARAMETERS
                  if error is ValueError and name != "reduction"
                  and not (isinstance(value, int) and abs(value) > 1e308)]
RAW_BAD_VALUES += [("reduction", 3), ("reduction", -1)]


@pytest.mark.parametrize("name, value", RAW_BAD_VALUES)
def test_the_raw_ops_refuse_the_parameters_fused_tes_loss_refuses(device, name, value):
    vis, txt, target = good(device=device)
    with pytest.raises(RuntimeError, match=rf"tes_loss_forward: {name} must be .*, got "):
        raw_forward(vis, txt, target, **{name: value})
    loss, row_stats, batch_stats = raw_forward(vis, txt, target)
    with pytest.raises(RuntimeError, match=rf"tes_loss_backward: {name} must be .*, got "):
        raw_backward(torch.ones_like(loss), vis, txt, target, row_stats, batch_stats,
                     **{name: value})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_callers_tensors_are_never_written(device, dtype):
    vis, txt, target = good(30, 1001)
    vis, txt = (x.to(device, dtype).requires_grad_() for x in (vis, txt))
    target = torch.randint(0, 1001, (30,)).to(device)
    target[::4] = -100
    before = [x.detach().clone() for x in (vis, txt, target)]
    for reduction in ("mean", "sum", "none"):
        tesloss.fused_tes_loss(vis, txt, target, reduction=reduction).sum().backward()
    for x, y in zip((vis, txt, target), before):
        assert torch.equal(x.detach(), y)


def test_the_smallest_tau_depends_on_the_accumulation_dtype():
    vis, txt, target = good()
    for dtype in (torch.bfloat16, torch.float16):
        with pytest.raises(ValueError, match=rf"tau must be at least 4.2397e-39 for {dtype} "):
            tesloss.fused_tes_loss(vis.to(dtype), txt.to(dtype), target, tau=1e-39)
    # Mixed logits are checked in the dtype they are promoted to.
    with pytest.raises(ValueError, match="for torch.float32 logits"):
        tesloss.fused_tes_loss(vis, txt.to(torch.bfloat16), target, tau=1e-39)
    assert torch.isfinite(tesloss.fused_tes_loss(vis.double(), txt.double(), target, tau=1e-39))


def test_mixed_dtypes_are_promoted_not_misread():
    vis, txt, target = good(4, 40)
    vis32 = vis.clone().requires_grad_()
    txt16 = txt.to(torch.bfloat16).requires_grad_()
    mixed = tesloss.fused_tes_loss(vis32, txt16, target)
    mixed.backward()
    same = tesloss.fused_tes_loss(vis, txt16.detach().float(), target)
    assert torch.equal(mixed.detach(), same)
    assert vis32.grad.dtype == torch.float32 and txt16.grad.dtype == torch.bfloat16


def test_the_raw_op_checks_its_tensors_too(device):
    vis, txt, target = good(device=device)
    with pytest.raises(RuntimeError, match="txt_logits must have the dtype of vis_logits"):
        raw_forward(vis, txt.double(), target)
    with pytest.raises(RuntimeError, match="target must be int64 class indices of shape "
                                           r"\[B\]=\[4\] or floating class probabilities"):
        raw_forward(vis, txt, target.int())
    with pytest.raises(RuntimeError, match=r"got Float of shape \[4, 9\]"):
        raw_forward(vis, txt, torch.rand(4, 9, device=device))
    with pytest.raises(RuntimeError, match="target must not require grad"):
        raw_forward(vis, txt, torch.rand(4, 10, device=device, requires_grad=True))
