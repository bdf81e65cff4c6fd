"""Loads the compiled library, reads the op's constants from it, and gives its ops the
fake kernels torch.compile traces with.

The library is the prebuilt tesloss._C when it was compiled for the torch in use, else
one compiled just in time for it (tesloss/_build.py), else none: fused_tes_loss then
runs the reference, and LOAD_ERROR says why. Autograd for the ops is bound in C++
(csrc/ops.cpp), for speed."""
import importlib
import importlib.util
import json
import os

import torch

from . import _build

# Order of ATen's x86 vector capabilities: a build for one runs on it and above.
_CAPABILITY_RANK = {"default": 0, "avx2": 1, "avx512": 2}


def _unfit_capability(capability):
    here = torch.backends.cpu.get_cpu_capability().lower()
    if _CAPABILITY_RANK.get(capability, 0) > _CAPABILITY_RANK.get(here, 0):
        return f"the prebuilt library was compiled for {capability} but this CPU reports {here}"
    return None


def _prebuilt():
    """(tesloss._C, None) when it fits the torch and CPU in use, else (None, why not)."""
    spec = importlib.util.find_spec(f"{__package__}._C")
    if spec is None:
        return None, ("no prebuilt library (tesloss was installed where its build could not "
                      "see torch, as under pip's build isolation, or was not built)")
    try:
        with open(os.path.join(os.path.dirname(spec.origin), _build.BUILD_INFO)) as file:
            recorded = json.load(file)
    except (OSError, ValueError) as error:
        return None, f"the prebuilt library's build record is unreadable ({error})"
    # Checked before the import: once loaded, its ops are registered for the process.
    mismatch = (_build.prebuilt_mismatch(recorded, _build.build_record())
                or _unfit_capability(recorded.get("cpu_capability")))
    if mismatch:
        return None, mismatch
    try:
        return importlib.import_module(f"{__package__}._C"), None
    except ImportError as error:
        return None, f"the prebuilt library does not load: {type(error).__name__}: {error}"


def _load():
    """(library or None, build, path, notes, why no library or None)."""
    library, why = _prebuilt()
    if library is not None:
        return library, "prebuilt", library.__file__, [], None
    if _build.flag("TESLOSS_NO_JIT"):
        return None, "reference", None, [why], f"{why}; TESLOSS_NO_JIT is set, so none was built"
    try:
        library, folder, notes = _build.jit_load()
    except (_build.BuildError, OSError) as error:  # never an import that fails for the cache
        return None, "reference", None, [why], f"{why}; and building one failed: {error}"
    return library, "jit", folder, [why, *notes], None


_C, BUILD, BUILD_PATH, BUILD_NOTES, LOAD_ERROR = _load()
LOADED = _C is not None
CPU_CAPABILITY = _C.cpu_capability if LOADED else None
BUILD_HINT = ("tesloss.backend_info() says why; python -m tesloss.build compiles the kernels "
              "again and shows the compiler's errors")

# The op's constants, as csrc/params.h defines them (empty without the library):
ROW_STATS = _C.row_stats if LOADED else ()  # names of the row_stats columns, in order
BATCH_STATS = _C.batch_stats if LOADED else ()  # names of the batch_stats entries, in order
REDUCTIONS = {name: code for code, name in enumerate(_C.reductions)} if LOADED else {}
PARAMS = _C.params if LOADED else ()  # ((name, schema type), ...) of the scalar arguments
_ACCUMULATION_DTYPES = _C.accumulation_dtypes if LOADED else {}
_MIN_TAU = _C.min_tau if LOADED else {}  # {logits dtype: the smallest tau the kernels take}


def acc_dtype(dtype):
    """The dtype the kernels accumulate logits of `dtype` in, and return the loss in."""
    return _ACCUMULATION_DTYPES[dtype]


def min_tau(dtype):
    """The smallest tau the kernels take for logits of `dtype`: 1 / tau must be finite in
    the accumulation dtype (0 without the library: the reference takes any tau > 0)."""
    return _MIN_TAU.get(dtype, 0.0)


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
    """Which compiled library is in use, why, and what it has kernels for.

    Keys: ``extension_loaded``; ``build``: ``"prebuilt"`` (compiled at install),
    ``"jit"`` (compiled on first use for the torch in use) or ``"reference"`` (none:
    fused_tes_loss runs the pure-PyTorch reference); ``library``: the loaded library's
    path, or a just-in-time build's folder; ``notes``: why the prebuilt library was
    not used and what the build left out (CUDA kernels skipped, and why);
    ``load_error``: why no library is in use, or None; ``kernels_for``: the device
    types it has compiled kernels for ("cuda" once the CUDA kernels are compiled, GPU
    or not); ``visible_gpus``: how many CUDA devices torch sees (counted without
    initialising CUDA); ``cpu_capability``: the vector ISA of the CPU kernels;
    ``cuda_compiled``.
    """
    devices = sorted(KERNEL_DEVICES)
    return {
        "extension_loaded": LOADED,
        "build": BUILD,
        "library": BUILD_PATH,
        "notes": list(BUILD_NOTES),
        "load_error": LOAD_ERROR,
        "kernels_for": devices,
        "visible_gpus": torch.cuda.device_count(),
        "cpu_capability": CPU_CAPABILITY,
        "cuda_compiled": "cuda" in devices,
    }


def extension_required() -> bool:
    return _build.flag("TESLOSS_REQUIRE_EXTENSION")


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

    @torch.library.register_fake("tesloss::tes_loss_step")
    def _step_fake(vis_logits, txt_logits, target, *params):
        shape = vis_logits.shape
        return (*_forward_fake(vis_logits, txt_logits, target, *params),
                vis_logits.new_empty(shape), txt_logits.new_empty(shape))

    @torch.library.register_fake("tesloss::tes_loss_backward")
    def _backward_fake(grad_loss, vis_logits, txt_logits, target, row_stats, batch_stats, tau,
                       lambda_v, lambda_t, ignore_index, reduction, label_smoothing):
        shape = vis_logits.shape
        return vis_logits.new_empty(shape), txt_logits.new_empty(shape)
