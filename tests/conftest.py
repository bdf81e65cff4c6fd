"""Shared pieces of the test suite: the devices every property runs on, the
tolerances of comparisons outside the rule, and the raw ops' keyword helpers.
The rule, the float64 truth and the cases are tesloss.testing's; the
Hypothesis strategy is cases.py's.
"""
import os
import shutil

import emulated_cuda
import filelock
import pytest
import torch
from emulated_cuda import EMULATED_CUDA, EmulatedCuda, describe
from hypothesis import HealthCheck, settings

from tesloss import _ops, testing
from tesloss.testing import RECIPE, Tolerance

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

# Each pytest-xdist worker takes its share of the cores. At torch's default, one
# OpenMP thread per core in every worker, each worker's threads spin-wait on cores
# the other worker is using, and the CPU cases ran several times slower. Tests of
# how rows split between threads set the thread count themselves.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // WORKERS))

# Every property runs on each of these (pytorch_scatter's `devices` list): the
# CPU kernels; the CUDA kernels on the host emulator, where a C++ compiler can
# build it (tests/emulated_cuda.py); and a GPU's, where there is one. Tests of
# what only a GPU has live in test_cuda.py; `pytest -m cuda` selects both, and
# `-m cuda_emulated` what runs on the emulator.
DEVICES = ["cpu"]
if shutil.which(os.environ.get("CXX", "c++")):
    DEVICES.append(pytest.param(EMULATED_CUDA, id="cuda_emulated",
                                marks=pytest.mark.cuda_emulated))
if torch.cuda.is_available():
    DEVICES.append(pytest.param("cuda", marks=pytest.mark.cuda))


@pytest.fixture(scope="session")
def shared_build(tmp_path_factory):
    """shared_build(name) -> (folder, lock): a folder that every pytest-xdist worker
    of this run sees, and a lock to build in it under. A library the tests compile
    is then compiled once per run, not once per worker: each compile of the
    emulator or of the schedules took a core for over a minute."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's pytest-N, above each worker's popen-gwK

    def folder_and_lock(name):
        folder = base / name
        folder.mkdir(exist_ok=True)
        return folder, filelock.FileLock(str(base / f"{name}.lock"))

    return folder_and_lock


@pytest.fixture(scope="session")
def emulator(shared_build):
    """The emulated CUDA op and the emulator's controls, built from the working tree."""
    folder, lock = shared_build("cuda_emulator")
    try:
        with lock:  # the second worker finds it built: ninja has nothing to do
            return emulated_cuda.build(folder)
    except emulated_cuda.NoCompiler as error:
        pytest.skip(str(error))
    except RuntimeError as error:
        pytest.fail(f"the CUDA emulator did not build:\n{error}")


@pytest.fixture(scope="session", params=DEVICES)
def device(request):
    """The device a property runs on, with the op's compiled kernels for it: without
    them fused_tes_loss would fall back to the reference and compare it with itself."""
    if isinstance(request.param, EmulatedCuda):
        request.getfixturevalue("emulator")
        return request.param
    if not _ops.has_kernel(request.param):
        message = (f"tesloss._C has no {request.param} kernels "
                   f"({_ops.LOAD_ERROR or 'built without them'})")
        if _ops.extension_required():
            pytest.fail(message)
        pytest.skip(message)
    return request.param


def for_the_emulator(device, full, scaled):
    """`full` on every device but the emulated CUDA one, which runs a few million
    elements a second: there `scaled`, which the case's comment says still reaches
    what `full` is there for."""
    return scaled if isinstance(device, EmulatedCuda) else full


# The raw ops the helpers below call: tesloss's, or the emulated ones while a
# test runs on the emulated CUDA device.
RAW_OPS = torch.ops.tesloss


@pytest.fixture(autouse=True)
def _kernels_of_the_device(request, monkeypatch):
    """While a test runs on the emulated CUDA device, fused_tes_loss and the raw-op
    helpers call the emulated op, on an emulated H200."""
    if "device" not in request.fixturenames:
        return
    device = request.getfixturevalue("device")
    if isinstance(device, EmulatedCuda):
        emulator = request.getfixturevalue("emulator")
        emulator.configure("H200")
        monkeypatch.setattr(_ops, "FORWARD", emulator.ops.tes_loss_forward.default)
        monkeypatch.setitem(globals(), "RAW_OPS", emulator.ops)


# Comparisons of other quantities with the fp64 reference (logged parts, spot
# checks), outside the rule: |fused - ref| <= atol * scale + rtol * |ref|, where
# `scale` is the size of what rounding acts on (testing.scales).
TOLERANCES = {
    torch.float64: Tolerance(rtol=1e-12, atol=1e-12),
    torch.float32: Tolerance(rtol=1e-5, atol=1e-5),
}
# Spot checks of one fixed fp32 input (graph replay, streams, devices), where no
# conditioning scale is computed: bounds far looser than the kernels' error that
# still catch a kernel reading the wrong data.
SPOT_CHECK = {"loss": Tolerance(rtol=1e-4, atol=1e-4), "grad": Tolerance(rtol=1e-4, atol=1e-7)}


def check_against_reference(case, dtype, device):
    """The case through fused_tes_loss on `device`, held to the rule."""
    testing.check_against_reference(case, dtype, device, where=describe(device))


def raw_params(**kwargs):
    """The raw ops' scalar arguments, by name, from fused_tes_loss's keywords:
    the recipe's where not given, and a reduction name as the op's code (an int
    reduction is passed as it is)."""
    params = {**RECIPE, **kwargs}
    if isinstance(params["reduction"], str):
        params["reduction"] = _ops.REDUCTIONS[params["reduction"]]
    return params


def raw_forward(vis_logits, txt_logits, target, **kwargs):
    """The raw forward op (RAW_OPS's) with fused_tes_loss's keywords."""
    return RAW_OPS.tes_loss_forward(vis_logits, txt_logits, target, **raw_params(**kwargs))


def raw_backward(grad_loss, vis_logits, txt_logits, target, row_stats, batch_stats, **kwargs):
    """The raw backward op (RAW_OPS's) with fused_tes_loss's keywords."""
    return RAW_OPS.tes_loss_backward(grad_loss, vis_logits, txt_logits, target, row_stats,
                                     batch_stats, **raw_params(**kwargs))
