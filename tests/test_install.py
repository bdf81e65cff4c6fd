"""Which compiled library tesloss loads, and why: a prebuilt one only under the torch it was
compiled for, else one compiled on first use, else the reference with the reason.

The install paths themselves (an sdist with and without build isolation into a venv with
only torch, a first-use build, a prebuilt library recorded for another torch) take minutes
and run in .ci/install_check."""
import inspect
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import tesloss
from tesloss import _build, _ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")


def test_backend_info_says_which_library_is_in_use_and_where():
    info = tesloss.backend_info()
    assert info["build"] in ("prebuilt", "jit") and info["load_error"] is None
    assert os.path.exists(info["library"])
    if info["build"] == "prebuilt":
        assert info["notes"] == []
    else:
        assert info["notes"], "a first-use build says why the prebuilt library was not used"


def test_a_prebuilt_library_for_another_torch_or_python_is_named_as_such():
    running = _build.build_record()
    assert _build.prebuilt_mismatch(dict(running), running) is None
    older = {**running, "torch": "2.4.1+cu121", "cuda": "12.1"}
    why = _build.prebuilt_mismatch(older, running)
    assert f"torch 2.4.1+cu121 (now {running['torch']})" in why
    assert f"cuda 12.1 (now {running['cuda']})" in why
    assert "python" not in why
    assert "python 3.9" in _build.prebuilt_mismatch({**running, "python": "3.9"}, running)


def test_a_prebuilt_library_for_a_wider_cpu_is_refused_before_it_is_loaded(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert "compiled for avx512 but this CPU reports avx2" in _ops._unfit_capability("avx512")
    assert _ops._unfit_capability("avx2") is None
    assert _ops._unfit_capability("default") is None


def test_the_first_use_build_name_changes_with_anything_the_binary_depends_on(tmp_path, monkeypatch):
    sources = tmp_path / "csrc"
    shutil.copytree(CSRC, sources)
    name = _build.jit_name(str(sources), "avx512", False, "")
    assert re.fullmatch(r"tesloss_avx512_[0-9a-f]{16}", name)
    assert _build.jit_name(str(sources), "avx512", False, "") == name
    assert _build.jit_name(str(sources), "avx2", False, "") != name
    assert _build.jit_name(str(sources), "avx512", True, "9.0").startswith("tesloss_avx512_cuda_")
    assert _build.jit_name(str(sources), "avx512", True, "9.0") != _build.jit_name(
        str(sources), "avx512", True, "8.0;9.0")
    header = sources / "cpu" / "vec_exp.h"
    header.write_text(header.read_text() + "\n")
    assert _build.jit_name(str(sources), "avx512", False, "") != name
    monkeypatch.setattr(_build, "build_record", lambda: {"torch": "9.9.9", "cuda": None,
                                                         "python": "3.11"})
    assert _build.jit_name(str(sources), "avx2", False, "") != _build.jit_name(
        str(CSRC), "avx2", False, "")


def test_nvcc_compiles_the_architectures_at_once_within_max_jobs(monkeypatch):
    monkeypatch.setenv("MAX_JOBS", "2")
    assert _build.nvcc_flags("9.0") == _build.NVCC_FLAGS
    assert _build.nvcc_flags("8.0;9.0") == _build.NVCC_FLAGS + ["--threads", "2"]
    assert _build.nvcc_flags("8.0;9.0;10.0;") == _build.NVCC_FLAGS + ["--threads", "2"]
    assert _build.nvcc_flags("8.0 9.0") == _build.NVCC_FLAGS + ["--threads", "2"]
    monkeypatch.setenv("MAX_JOBS", "1")
    assert _build.nvcc_flags("8.0;9.0") == _build.NVCC_FLAGS


@pytest.mark.skipif(torch.version.cuda is None, reason="a torch without CUDA compiles no CUDA kernels")
def test_the_cuda_kernels_are_skipped_with_the_reason(monkeypatch):
    from torch.utils import cpp_extension

    for name in ("FORCE_CUDA", "TESLOSS_NO_CUDA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _build.cuda_plan(for_jit=True) == (
        False, "CUDA kernels skipped: no GPU is visible (FORCE_CUDA=1 builds them anyway)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    built, why = _build.cuda_plan(for_jit=True)
    assert not built and "nvcc was not found" in why and "CUDA_HOME" in why
    monkeypatch.setenv("FORCE_CUDA", "1")
    with pytest.raises(_build.BuildError, match="FORCE_CUDA is set but nvcc was not found"):
        _build.cuda_plan(for_jit=True)
    monkeypatch.setenv("TESLOSS_NO_CUDA", "1")
    assert _build.cuda_plan(for_jit=True) == (False, "CUDA kernels skipped: TESLOSS_NO_CUDA is set")
    monkeypatch.delenv("FORCE_CUDA")
    monkeypatch.delenv("TESLOSS_NO_CUDA")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    assert _build.cuda_plan(for_jit=True) == (True, None)


def test_every_file_the_sources_include_is_installed_with_them():
    # What the sdist and tesloss/_csrc carry is source_files(): every quoted
    # #include of every file in it must be in it too, or the first-use build breaks.
    files = set(_build.source_files(CSRC))
    assert {"tes_loss.h", "cpu/tes_loss_cpu.cpp", "cuda/tes_loss_cuda.cu"} <= files
    for path in files:
        with open(os.path.join(CSRC, path)) as source:
            for included in re.findall(r'^\s*#\s*include\s+"([^"]+)"', source.read(), re.M):
                here = os.path.normpath(os.path.join(os.path.dirname(path), included))
                assert included in files or here in files, f"{path} includes {included}"
    on_disk = {os.path.relpath(os.path.join(folder, name), CSRC)
               for folder, _, names in os.walk(CSRC) for name in names
               if name.endswith((".h", ".cuh", ".cpp", ".cu"))}
    assert on_disk == files


def _copy_of_the_package(base, sources=False):
    """A copy of the package under `base` that has no tesloss._C, and the kernels'
    sources only if asked."""
    package = base / "tesloss"
    package.mkdir()
    for name in os.listdir(os.path.join(ROOT, "tesloss")):
        if name.endswith(".py"):
            shutil.copy(os.path.join(ROOT, "tesloss", name), package)
    if sources:
        shutil.copytree(CSRC, package / _build.INSTALLED_SOURCES)


# Imports the copy of the package in argv[1] (an editable install's finder would hand
# it the source tree's tesloss._C), prints backend_info, then a call's error or "ran".
_IMPORT_THE_COPY = """import sys
sys.meta_path[:] = [f for f in sys.meta_path
                    if not getattr(f, '__module__', '').startswith('__editable__')]
import json, torch, tesloss
assert tesloss.__file__.startswith(sys.argv[1]), tesloss.__file__
print(json.dumps(tesloss.backend_info()))
try:
    tesloss.fused_tes_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2).long())
    print('ran')
except RuntimeError as error:
    print(error)
"""


def _run_the_copy(base, unprivileged=False, background=False, **env):
    """Runs _IMPORT_THE_COPY on the copy under `base`: as root without the capabilities
    that ignore file modes, if `unprivileged` (so a read-only folder is read-only)."""
    command = [sys.executable, "-c", _IMPORT_THE_COPY, str(base)]
    if unprivileged and os.geteuid() == 0:
        command = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--", *command]
    environment = {**os.environ, "TESLOSS_REQUIRE_EXTENSION": "1",
                   "TORCH_EXTENSIONS_DIR": str(base / "extensions"), **env}
    if background:
        return subprocess.Popen(command, cwd=base, env=environment, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(command, cwd=base, env=environment, capture_output=True, text=True,
                          timeout=600)


def _import_in_a_copy_without_the_library(tmp_path, sources=False, **env):
    """What _IMPORT_THE_COPY printed from a fresh copy of the package."""
    _copy_of_the_package(tmp_path, sources)
    done = _run_the_copy(tmp_path, **env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_without_a_library_or_sources_it_says_why_and_require_extension_stops_it(tmp_path):
    info, error = _import_in_a_copy_without_the_library(tmp_path).splitlines()[:2]
    assert '"build": "reference"' in info
    assert "no prebuilt library" in info and "the kernels' sources are not installed" in info
    assert "circular import" not in info
    assert "TESLOSS_REQUIRE_EXTENSION is set" in error and "no prebuilt library" in error


def test_without_a_compiler_it_says_so(tmp_path):
    info = _import_in_a_copy_without_the_library(tmp_path, sources=True,
                                                 CXX="no-such-compiler")
    assert '"build": "reference"' in info
    assert "building one failed: no C++ compiler: 'no-such-compiler' is not on the PATH" in info


def test_no_jit_means_no_build_on_first_use(tmp_path):
    info = _import_in_a_copy_without_the_library(tmp_path, TESLOSS_NO_JIT="1")
    assert '"build": "reference"' in info and "TESLOSS_NO_JIT is set" in info


def test_a_clone_named_tesloss_does_not_hide_the_package_from_its_parent_folder(tmp_path):
    """The README clones into a folder named tesloss: Python run from the folder above
    it must import the package, not that folder as an empty namespace package."""
    (tmp_path / "tesloss").symlink_to(ROOT, target_is_directory=True)
    done = subprocess.run([sys.executable, "-c", "import tesloss; print(tesloss.__file__)"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == tesloss.__file__


def test_python_m_tesloss_build_reports_the_library_in_use():
    done = subprocess.run([sys.executable, "-m", "tesloss.build"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f'"build": "{tesloss.backend_info()["build"]}"' in done.stdout


def test_the_public_functions_are_typed_and_the_package_says_so():
    assert os.path.exists(os.path.join(ROOT, "tesloss", "py.typed"))
    from tesloss import text

    for function in (tesloss.fused_tes_loss, tesloss.reference.tes_loss, tesloss.backend_info,
                     tesloss.TeSLoss.__init__, tesloss.TeSLoss.forward, tesloss.TeSHead.__init__,
                     tesloss.TeSHead.forward, text.build_text_head, text.save_text_head,
                     text.load_text_head, text.encoder_from_spec):
        parameters = set(inspect.signature(function).parameters) - {"self"}
        assert set(function.__annotations__) == parameters | {"return"}, function.__qualname__


# The first-use build's cache: import never fails because of it. One copy of the
# package serves these tests, with a temporary directory of its own (TMPDIR), so the
# build that the unwritable cache sends there is compiled once, by whichever
# pytest-xdist worker comes first; the others read what that first import printed.
@pytest.fixture(scope="module")
def cache_copy(shared_build):
    base, lock = shared_build("first_use_cache")
    env = {"TESLOSS_NO_CUDA": "1", "TMPDIR": str(base / "tmp")}
    printed = base / "first_import.json"
    with lock:
        if not printed.exists():
            _copy_of_the_package(base, sources=True)
            (base / "tmp").mkdir(mode=0o700)
            unwritable = base / "unwritable"
            unwritable.mkdir(mode=0o555)
            done = _run_the_copy(base, unprivileged=True, TORCH_EXTENSIONS_DIR=str(unwritable),
                                 **env)
            printed.write_text(json.dumps({"returncode": done.returncode,
                                           "stdout": done.stdout, "stderr": done.stderr}))
    first = subprocess.CompletedProcess([], **json.loads(printed.read_text()))
    return base, env, first


def _outcome(done):
    assert done.returncode == 0, done.stderr
    info, result = done.stdout.splitlines()[:2]
    return json.loads(info), result


def test_an_unwritable_cache_builds_in_a_folder_of_the_users_own(cache_copy):
    base, _, first = cache_copy
    info, result = _outcome(first)
    assert info["build"] == "jit" and result == "ran"
    assert info["library"].startswith(str(base / "tmp" / "tesloss_extensions_"))
    note = " ".join(info["notes"])
    assert f"the extensions cache {base / 'unwritable'} cannot be written (Permission denied" in note
    assert "set TORCH_EXTENSIONS_DIR to a writable folder" in note
    assert first.stderr.count("compiling") == 1


def test_a_cache_below_a_file_does_too(cache_copy):
    base, env, first = cache_copy
    (base / "a_file").write_text("")
    done = _run_the_copy(base, TORCH_EXTENSIONS_DIR=str(base / "a_file" / "cache"), **env)
    info, result = _outcome(done)
    assert result == "ran" and info["library"] == json.loads(first.stdout.splitlines()[0])["library"]
    assert "cannot be written (Not a directory" in " ".join(info["notes"])
    assert "compiling" not in done.stderr  # the build of the first test, loaded


def _cache_with_a_truncated_library(base, first, name):
    folder = json.loads(first.stdout.splitlines()[0])["library"]  # a first-use build's folder
    cache = base / name
    shutil.copytree(folder, cache / os.path.basename(folder))
    library = cache / os.path.basename(folder) / f"{os.path.basename(folder)}.so"
    library.write_bytes(library.read_bytes()[:4096])
    return cache, library


def test_a_read_only_cache_holding_a_broken_library_says_to_delete_it(cache_copy):
    base, env, first = cache_copy
    cache, library = _cache_with_a_truncated_library(base, first, "read_only")
    folders = [cache, library.parent]
    for folder in folders:
        folder.chmod(0o555)
    try:
        done = _run_the_copy(base, unprivileged=True, TORCH_EXTENSIONS_DIR=str(cache), **env)
    finally:
        for folder in folders:
            folder.chmod(0o755)
    info, result = _outcome(done)
    assert result == "ran" and info["library"].startswith(str(base / "tmp"))
    note = " ".join(info["notes"])
    assert f"the cached library in {library.parent} is broken" in note
    assert f"delete {library.parent}" in note


def test_a_truncated_library_is_built_again(cache_copy):
    base, env, first = cache_copy
    cache, library = _cache_with_a_truncated_library(base, first, "writable")
    done = _run_the_copy(base, TORCH_EXTENSIONS_DIR=str(cache), **env)
    info, result = _outcome(done)
    assert result == "ran" and info["library"] == str(library.parent)
    assert done.stderr.count("compiling") == 1
    again = _run_the_copy(base, TORCH_EXTENSIONS_DIR=str(cache), **env)
    assert _outcome(again)[1] == "ran" and "compiling" not in again.stderr


def test_processes_starting_at_once_share_one_build(cache_copy):
    base, env, _ = cache_copy
    ranks = [_run_the_copy(base, background=True, TORCH_EXTENSIONS_DIR=str(base / "shared"),
                           **env) for _ in range(4)]
    outputs = [rank.communicate(timeout=600) for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks), [err for _, err in outputs]
    assert all(out.splitlines()[1] == "ran" for out, _ in outputs)
    logs = "".join(err for _, err in outputs)
    assert logs.count("compiling") == 1, logs
    assert logs.count("another process built its kernels") == 3, logs
