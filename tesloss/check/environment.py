"""What is in use: the library, torch, CUDA and each device with kernels."""
import platform
import sys

import torch

from .. import __version__, _ops


def devices_with_kernels():
    """"cpu" and each visible CUDA device ("cuda:0", ...) the library has kernels for."""
    devices = ["cpu"] if _ops.has_kernel("cpu") else []
    if _ops.has_kernel("cuda") and torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return devices


def _driver_version():
    try:
        import ctypes

        version = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version))
        return f"{version.value // 1000}.{version.value % 1000 // 10}"
    except (OSError, AttributeError):
        return None


def describe_device(device):
    """The device's name and what its kernels are compiled for."""
    if device == "cpu":
        return {"name": platform.processor() or platform.machine(),
                "cpu_capability": _ops.CPU_CAPABILITY,
                "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count}


def environment():
    return {
        "tesloss": __version__,
        "backend": _ops.backend_info(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "cuda_driver": _driver_version() if torch.cuda.is_available() else None,
    }
