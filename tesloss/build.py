"""python -m tesloss.build: have tesloss's kernels compiled for the torch in use, now.

Importing tesloss already compiles them when no prebuilt library fits (once per torch,
into torch's extensions cache, TORCH_EXTENSIONS_DIR). Run this to do it ahead of time,
while building a Docker image, say, so that the first training step does not wait:

    FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="9.0" python -m tesloss.build

FORCE_CUDA=1 compiles the CUDA kernels where no GPU is visible (a docker build);
TORCH_CUDA_ARCH_LIST names the GPUs' architectures, which, set the same at run time or
found on the visible GPUs, pick the cached build. It prints what is in use, as
tesloss.backend_info() says. When no compiled library could be had, it compiles once
more with the compiler's output shown, and exits 1.
"""
import argparse
import json
import sys

from . import _build, _ops


def main(argv=None):
    argparse.ArgumentParser(prog="python -m tesloss.build",
                            description=__doc__.split("\n")[0]).parse_args(argv)
    info = _ops.backend_info()  # importing tesloss loaded, or compiled, the library
    print(json.dumps(info, indent=2))
    if info["extension_loaded"]:
        return 0
    print(f"tesloss: no compiled library is in use: {info['load_error']}", file=sys.stderr)
    if not _build.flag("TESLOSS_NO_JIT"):
        print("tesloss: compiling again, with the compiler's output shown", file=sys.stderr)
        try:
            _build.jit_load(verbose=True)
        except _build.BuildError as error:
            print(f"tesloss: the build failed: {error}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
