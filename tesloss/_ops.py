"""Loads the compiled library, reads the op's constants from it, and gives its ops the
fake kernels torch.compile traces with.

Autograd for the ops is bound in C++ (csrc/ops.cpp), for speed."""
import os

import torch

_LOAD_ERROR = None
_C = None

# Order of ATen's x86 vector capabilities: a build for one runs on it and above.
_CAPABILITY_RANK = {"default": 0, "avx2": 1, "avx512": 2}


def _load():
    global _LOAD_ERROR, _C
    try:
        from . import _C as library
    except ImportError as error:  # not built, or built against another torch
        _LOAD_ERROR = f"{type(error).__name__}: {error}"
        return False
    _C = library
    here = torch.backends.cpu.get_cpu_capability().lower()
    if _CAPABILITY_RANK.get(_C.cpu_capability, 0) > _CAPABILITY_RANK.get(here, 0):
        _LOAD_ERROR = (
            f"tesloss._C was compiled for {_C.cpu_capability} but this CPU reports {here}; "
            "rebuild here, or with TESLOSS_CPU_CAPABILITY set to what every machine has"
        )
        return False
    return True


LOADED = _load()
LOAD_ERROR = _LOAD_ERROR
CPU_CAPABILITY = _C.cpu_capability if _C is not None else None
BUILD_HINT = "build it with: pip install --no-build-isolation -e .  (or: make install)"

# The op's constants, as csrc/params.h defines them (empty without the library):
ROW_STATS = _C.row_stats if LOADED else ()  # names of the row_stats columns, in order
BATCH_STATS = _C.batch_stats if LOADED else ()  # names of the batch_stats entries, in order
REDUCTIONS = {name: code for code, name in enumerate(_C.reductions)} if LOADED else {}
PARAMS = _C.params if LOADED else ()  # ((name, schema type), ...) of the scalar arguments
_ACCUMULATION_DTYPES = _C.accumulation_dtypes if LOADED else {}


def acc_dtype(dtype):
    """The dtype the kernels accumulate logits of `dtype` in, and return the loss in."""
    return _ACCUMULATION_DTYPES[dtype]


def _kernel_devices():
    if not LOADED:
        return frozenset()
    return frozenset(
        device for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
        if torch._C._dispatch_has_kernel_for_dispatch_key("tesloss::tes_loss_forward", key)
    )


# Read once: a dispatcher query inside fused_tes_loss would break torch.compile graphs.
KERNEL_DEVICES = _kernel_devices()


# The forward op's overload, looked up once, outside the training step.
FORWARD = torch.ops.tesloss.tes_loss_forward.default if LOADED else None


def has_kernel(device_type: str) -> bool:
    """Whether the compiled library has kernels for tensors on `device_type`."""
    return device_type in KERNEL_DEVICES


def backend_info() -> dict:
    """Whether the compiled extension is loaded, and what it has kernels for.

    Keys: ``extension_loaded``, ``load_error`` (why not, or None),
    ``devices`` (device types with compiled kernels), ``cpu_capability``
    (the vector ISA the CPU kernels were built for) and ``cuda_compiled``.
    """
    devices = sorted(KERNEL_DEVICES)
    return {
        "extension_loaded": LOADED,
        "load_error": LOAD_ERROR,
        "devices": devices,
        "cpu_capability": CPU_CAPABILITY,
        "cuda_compiled": "cuda" in devices,
    }


def extension_required() -> bool:
    return os.environ.get("TESLOSS_REQUIRE_EXTENSION", "") not in ("", "0")


if LOADED:
    @torch.library.register_fake("tesloss::tes_loss_forward")
    def _forward_fake(vis_logits, txt_logits, target, tau, lambda_v, lambda_t, ignore_index,
                      reduction, label_smoothing):
        acc = acc_dtype(vis_logits.dtype)
        batch = vis_logits.shape[0]
        per_row = reduction == REDUCTIONS["none"]
        loss = vis_logits.new_empty((batch,) if per_row else (), dtype=acc)
        row_stats = vis_logits.new_empty((batch, len(ROW_STATS)), dtype=acc)
        batch_stats = vis_logits.new_empty((len(BATCH_STATS),), dtype=acc)
        return loss, row_stats, batch_stats

    @torch.library.register_fake("tesloss::tes_loss_backward")
    def _backward_fake(grad_loss, vis_logits, txt_logits, target, row_stats, batch_stats, tau,
                       lambda_v, lambda_t, ignore_index, reduction, label_smoothing):
        shape = vis_logits.shape
        return vis_logits.new_empty(shape), txt_logits.new_empty(shape)
