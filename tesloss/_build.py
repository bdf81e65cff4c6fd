"""How tesloss's compiled library is built: its sources, compiler flags and CUDA toolkit.

Both builds read this file. setup.py loads it by path for the ahead-of-time build
(``pip install --no-build-isolation``), and ``tesloss._ops`` calls :func:`jit_load` on
first use when no prebuilt library fits the torch in use. In that case the library is
compiled with ``torch.utils.cpp_extension.load`` (ninja) into torch's extensions cache,
under a name that hashes everything the binary depends on, so a cached build is only
ever loaded by the torch, Python and sources it was compiled for.

This module imports nothing of tesloss, and torch only inside functions, so that
setup.py can read it without torch.
"""
import glob
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import sysconfig
import threading
import time

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Written beside a prebuilt tesloss._C: the torch it was compiled against.
BUILD_INFO = "_build_info.json"
# Where the kernels' sources are installed inside the package (setup.py's build_py).
INSTALLED_SOURCES = "_csrc"
SOURCE_PATTERNS = ("*.h", "*.cpp", "cpu/*.h", "cpu/*.cpp", "cuda/*.h", "cuda/*.cuh", "cuda/*.cu")
# Written in a just-in-time build's folder once its library has loaded.
READY = "READY"
# Architectures compiled when no GPU is visible and TORCH_CUDA_ARCH_LIST is unset.
DEFAULT_CUDA_ARCHS = "8.0;9.0"

# ATen's own flags for each of its x86 vector capabilities.
CPU_CAPABILITY_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": ["-DCPU_CAPABILITY=DEFAULT"],
}
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-DWITH_CUDA"]
# libstdc++ named outright: a compiler that links it statically by default (the
# H200 machine's /opt/gcc/bin/g++ does) gives the library its own copy, and the
# errors it throws then crash torch (segfaults with torch 2.11, lose their
# message's text with 2.14) instead of reaching Python. Named, it links shared.
LDFLAGS = ["-fopenmp", "-lstdc++"]


class BuildError(RuntimeError):
    """The library could not be compiled here; the message says why."""


def flag(name):
    return os.environ.get(name, "") not in ("", "0")


def source_root():
    """csrc as installed in the package, or the source tree's, or None."""
    for root in (os.path.join(PACKAGE_DIR, INSTALLED_SOURCES),
                 os.path.join(os.path.dirname(PACKAGE_DIR), "csrc")):
        if os.path.isfile(os.path.join(root, "tes_loss.h")):
            return root
    return None


def source_files(root):
    """Every file the build reads, relative to root."""
    found = (glob.glob(os.path.join(root, pattern)) for pattern in SOURCE_PATTERNS)
    return sorted(os.path.relpath(path, root) for paths in found for path in paths)


def compiled_sources(root, cuda):
    return [os.path.join(root, path) for path in source_files(root)
            if path.endswith(".cpp") or (cuda and path.endswith(".cu"))]


def set_cuda_home():
    """torch takes the CUDA home from nvcc's folder, which is wrong when nvcc on the PATH
    is a wrapper script outside the toolkit: look for the toolkit nvcc belongs to
    instead. CUDA_HOME, if set, wins. Call before torch.utils.cpp_extension is imported."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


def cpu_capability():
    """The CPU kernels' vector ISA: TESLOSS_CPU_CAPABILITY, else what torch reports here."""
    import torch

    choice = os.environ.get("TESLOSS_CPU_CAPABILITY", "auto").lower()
    if choice == "auto":
        reported = torch.backends.cpu.get_cpu_capability()
        choice = {"AVX512": "avx512", "AVX2": "avx2"}.get(reported, "default")
    if choice not in CPU_CAPABILITY_FLAGS:
        raise BuildError(f"TESLOSS_CPU_CAPABILITY must be one of {sorted(CPU_CAPABILITY_FLAGS)} "
                         f"or auto, got {choice!r}")
    return choice


def cxx_flags(capability, cuda):
    flags = ["-O3", "-fopenmp", f"-DTESLOSS_CPU_CAPABILITY_NAME={capability}"]
    return flags + CPU_CAPABILITY_FLAGS[capability] + (["-DWITH_CUDA"] if cuda else [])


def wheel_cuda_include_dirs(cuda_home):
    """ATen's CUDA headers include cuSPARSE's and cuBLAS's. A toolkit with nvcc alone
    lacks them; torch's CUDA wheels bring them under site-packages/nvidia."""
    if os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    try:
        import nvidia
    except ImportError:
        return []
    return sorted(d for root in nvidia.__path__ for d in glob.glob(os.path.join(root, "*", "include")))


def cuda_plan(for_jit):
    """(compile the CUDA kernels?, why not, or None). FORCE_CUDA=1 asks for them whatever
    is visible; TESLOSS_NO_CUDA=1 never. Otherwise the ahead-of-time build compiles them
    when torch has CUDA and nvcc is found, and the just-in-time build only when a GPU is
    visible too, since nobody here could run them."""
    import torch

    if flag("TESLOSS_NO_CUDA"):
        return False, "CUDA kernels skipped: TESLOSS_NO_CUDA is set"
    if torch.version.cuda is None:
        return False, None
    if for_jit and not flag("FORCE_CUDA") and not torch.cuda.is_available():
        return False, "CUDA kernels skipped: no GPU is visible (FORCE_CUDA=1 builds them anyway)"
    # Imported only now: importing it without a GPU logs a warning about CUDA_HOME.
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        if flag("FORCE_CUDA"):
            raise BuildError("FORCE_CUDA is set but nvcc was not found: put it on the PATH, or "
                             "set CUDA_HOME to a CUDA toolkit")
        return False, ("CUDA kernels skipped: nvcc was not found (put it on the PATH, or set "
                       "CUDA_HOME to a CUDA toolkit)")
    return True, None


def nvcc_flags(archs):
    """NVCC_FLAGS, and --threads for the architectures in `archs`: the CUDA kernels
    are one .cu file, which nvcc otherwise compiles for one architecture after the
    other (sm_80 and sm_90 on a 2-core VM: 4.8 minutes, 2.7 with --threads 2).
    MAX_JOBS caps it, as it caps ninja's jobs."""
    try:
        jobs = int(os.environ.get("MAX_JOBS", ""))
    except ValueError:
        jobs = os.cpu_count() or 1
    threads = min(len(_arch_set(archs)), jobs)
    return NVCC_FLAGS + (["--threads", str(threads)] if threads > 1 else [])


def cuda_archs():
    """TORCH_CUDA_ARCH_LIST, else the visible GPUs', else DEFAULT_CUDA_ARCHS."""
    import torch

    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if archs:
        return ";".join(sorted(_arch_set(archs)))
    if torch.cuda.is_available():
        found = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return ";".join(f"{major}.{minor}" for major, minor in sorted(found))
    return DEFAULT_CUDA_ARCHS


def _arch_set(archs):
    """The architectures a TORCH_CUDA_ARCH_LIST names: torch takes spaces as well as
    semicolons between them."""
    return set(archs.replace(" ", ";").split(";")) - {""}


def build_record():
    """What a compiled library must match to load: the torch and Python in use."""
    import torch

    return {"torch": str(torch.__version__), "cuda": torch.version.cuda,
            "python": f"{sys.version_info.major}.{sys.version_info.minor}"}


def prebuilt_mismatch(recorded, running):
    """Why a prebuilt library recorded as `recorded` does not fit `running`, or None."""
    changed = [f"{key} {recorded.get(key)} (now {running[key]})" for key in running
               if recorded.get(key) != running[key]]
    return "the prebuilt library was compiled for " + ", ".join(changed) if changed else None


def jit_name(root, capability, cuda, archs):
    """The extension's name: a hash of the sources, flags, torch and Python it is built for."""
    digest = hashlib.sha256(json.dumps([build_record(), capability, cuda, archs,
                                        cxx_flags(capability, cuda), NVCC_FLAGS]).encode())
    for path in source_files(root):
        with open(os.path.join(root, path), "rb") as file:
            digest.update(path.encode() + b"\0" + file.read())
    variant = f"{capability}_cuda" if cuda else capability
    return f"tesloss_{variant}_{digest.hexdigest()[:16]}"


def extensions_root():
    """TORCH_EXTENSIONS_DIR, else torch's default (~/.cache/torch_extensions)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    try:  # what get_default_build_root returns, without importing cpp_extension
        from torch._appdirs import user_cache_dir
    except ImportError:
        from torch.utils.cpp_extension import get_default_build_root

        return get_default_build_root()
    return os.path.realpath(user_cache_dir(appname="torch_extensions"))


def _import_library(name, folder):
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, f"{name}.so"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Progress:
    """One line on stderr while something slow runs, ending with how long it took:
    counted in place on a terminal; in a log, a start line (if `start_line`) and an
    end line that says `done`."""

    def __init__(self, what, done, start_line=True):
        self.what, self.finished, self.start_line = what, done, start_line
        self.start, self.done = time.monotonic(), threading.Event()
        self.tty = sys.stderr.isatty()

    def __enter__(self):
        if self.tty:
            threading.Thread(target=self._tick, daemon=True).start()
        elif self.start_line:
            print(f"tesloss: {self.what}...", file=sys.stderr, flush=True)
        return self

    def _tick(self):
        while not self.done.wait(1.0):
            print(f"\rtesloss: {self.what}... {time.monotonic() - self.start:.0f} s",
                  end="", file=sys.stderr, flush=True)

    def __exit__(self, kind, error, trace):
        self.done.set()
        seconds = f"{time.monotonic() - self.start:.0f} s"
        line = (f"{self.what}: failed after {seconds}" if kind else
                f"{self.what}: done in {seconds}" if self.tty else f"{self.finished} in {seconds}")
        print(f"{chr(13) if self.tty else ''}tesloss: {line}", file=sys.stderr, flush=True)


def _with_ninja_on_path():
    """torch runs `ninja` from the PATH; a venv's own bin is not on it unless activated."""
    if shutil.which("ninja"):
        return
    for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        if os.path.isfile(os.path.join(folder, "ninja")):
            os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")
            return
    raise BuildError("ninja was not found: pip install ninja")


def _cached(name, folder):
    """The library cached in `folder`, or None. A broken one's files are removed so
    that the build links it again; OSError if they cannot be."""
    from . import _cache

    library = os.path.join(folder, f"{name}.so")
    try:
        with open(os.path.join(folder, READY)) as file:
            built = json.load(file).get("library_bytes")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        built = f"READY unreadable: {error}"
    try:
        # Checked before it is loaded: a library cut short past its headers maps, and
        # then kills the process with SIGBUS where the missing pages are touched.
        size = os.path.getsize(library)
        if built is not None and size != built:
            raise ImportError(f"{library} has {size} bytes, not the {built} it was built with")
        return _import_library(name, folder)
    except (ImportError, OSError) as error:  # cut short, say, or gone
        _cache.remove_broken(folder, (READY, f"{name}.so"), error)
    return None


def _compile(root, capability, cuda, archs, verbose):
    """(library, folder, notes): the library for these kernels, from the cache or
    compiled into it. Every filesystem problem is a BuildError that says what to do."""
    from . import _cache  # here: setup.py loads this file alone, and never compiles on first use

    name = jit_name(root, capability, cuda, archs)
    configured = os.path.join(extensions_root(), name)
    notes = []
    try:
        library = None if verbose else _cached(name, configured)
    except OSError as error:  # broken, and in a folder that cannot be written
        library, notes = None, [str(error)]
    if library is not None:
        return library, configured, notes
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise BuildError(f"no C++ compiler: {compiler!r} is not on the PATH (install g++, or "
                         "set CXX)")
    _with_ninja_on_path()
    try:
        folder, note = _cache.build_folder(extensions_root(), name)
        notes += [note] if note else []
        waiting = _Progress(f"waiting for another process's build of its kernels in {folder}",
                            f"another process built its kernels in {folder}; waited",
                            start_line=False)
        with _cache.exclusive(folder, lambda: waiting) as waited:
            library = None if verbose and not waited else _cached(name, folder)
            if library is None:
                library = _build_into(folder, name, root, capability, cuda, archs, verbose)
                with open(os.path.join(folder, READY), "w") as file:
                    json.dump({**build_record(), "library_bytes": os.path.getsize(
                        os.path.join(folder, f"{name}.so"))}, file)
    except OSError as error:
        raise BuildError(f"{'; '.join(notes + [str(error)])}; set TORCH_EXTENSIONS_DIR to a "
                         "writable folder") from error
    return library, folder, notes


def _build_into(folder, name, root, capability, cuda, archs, verbose):
    from torch.utils.cpp_extension import CUDA_HOME, load

    include = [root] + (wheel_cuda_include_dirs(CUDA_HOME) if cuda else [])
    kernels = f"CPU {capability}" + (f" and CUDA {archs}" if cuda else "")
    saved_archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if cuda:  # what torch compiles for; the name hashed the same list
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    try:
        with _Progress(f"compiling its {kernels} kernels for torch {build_record()['torch']} "
                       f"on first use, into {folder}", f"built its {kernels} kernels"):
            return load(name, compiled_sources(root, cuda), extra_cflags=cxx_flags(capability, cuda),
                        extra_cuda_cflags=nvcc_flags(archs) if cuda else None,
                        extra_ldflags=LDFLAGS,
                        extra_include_paths=include, build_directory=folder, verbose=verbose,
                        with_cuda=cuda)
    except (RuntimeError, OSError, ImportError) as error:
        lines = [line for line in str(error).splitlines() if line.strip()]
        shown = [line for line in lines if "error" in line.lower()][:5] or lines[-5:]
        raise BuildError("; ".join(shown) + f" (the build's files are in {folder})") from error
    finally:
        if saved_archs is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved_archs


def jit_load(verbose=False):
    """Compiles (or loads from the cache) the library for the torch in use.

    Returns (module, folder, notes): notes say what was left out and why. Raises
    BuildError when no library could be built."""
    root = source_root()
    if root is None:
        raise BuildError(f"the kernels' sources are not installed ({INSTALLED_SOURCES} is "
                         f"missing from {PACKAGE_DIR})")
    set_cuda_home()
    capability = cpu_capability()
    cuda, note = cuda_plan(for_jit=True)
    notes = [note] if note else []
    if cuda:
        try:
            library, folder, cache_notes = _compile(root, capability, True, cuda_archs(), verbose)
            return library, folder, notes + cache_notes
        except BuildError as error:
            if flag("FORCE_CUDA"):
                raise
            notes.append(f"CUDA kernels skipped: their build failed: {error}")
    library, folder, cache_notes = _compile(root, capability, False, "", verbose)
    return library, folder, notes + cache_notes
