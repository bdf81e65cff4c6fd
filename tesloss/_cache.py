"""Where a first-use build goes, and how processes share it.

The build goes into the extensions cache (TORCH_EXTENSIONS_DIR, else torch's
default), or, where that cannot be written, into a folder of this user's alone
under the temporary directory, with a note that says why. A lock in the build's
folder lets one process compile while the others wait and then load its library
(torchrun's first run starts every rank at once). Like _build.py, this module
imports nothing of tesloss and no torch.
"""
import contextlib
import os
import tempfile

try:
    import fcntl
except ImportError:  # not POSIX: no lock of ours; torch's own build lock still serialises
    fcntl = None

LOCK = "tesloss.lock"


class CacheError(OSError):
    """No folder that a build could go in."""


def _writable(folder):
    """Creates `folder` if need be, and proves it writable by writing a file in it."""
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
        pass


def _user_temp_root():
    """A folder of this user's alone under the temporary directory: never one that
    another user made, or could write a library into."""
    user = os.getuid() if hasattr(os, "getuid") else os.getlogin()
    root = os.path.join(tempfile.gettempdir(), f"tesloss_extensions_{user}")
    os.makedirs(root, mode=0o700, exist_ok=True)
    info = os.stat(root)
    if hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & 0o022):
        raise PermissionError(f"{root} belongs to another user, or others can write it")
    return root


def _reason(error):
    return f"{error.strerror}: {error.filename}" if error.strerror and error.filename else str(error)


def build_folder(root, name):
    """(folder, note): root/name where it can be written, note None; else the user's
    temporary root/name, and a note that says why and what to set. Raises CacheError
    if neither can be written."""
    try:
        _writable(os.path.join(root, name))
        return os.path.join(root, name), None
    except OSError as error:
        why = f"the extensions cache {root} cannot be written ({_reason(error)})"
    try:
        fallback = os.path.join(_user_temp_root(), name)
        _writable(fallback)
    except OSError as error:
        raise CacheError(f"{why}, nor can a folder under {tempfile.gettempdir()} "
                         f"({_reason(error)}): set TORCH_EXTENSIONS_DIR to a writable folder")
    return fallback, (f"{why}: compiled into {fallback} instead; set TORCH_EXTENSIONS_DIR "
                      f"to a writable folder to keep the build")


def remove_broken(folder, files, broken):
    """Removes a broken cached library's `files`, so that the build links it again.
    Raises OSError, saying to delete the folder, where they cannot be removed."""
    for name in files:
        try:
            os.remove(os.path.join(folder, name))
        except FileNotFoundError:
            pass
        except OSError as error:
            raise OSError(f"the cached library in {folder} is broken ({broken}) and cannot be "
                          f"removed ({_reason(error)}): delete {folder}") from error


@contextlib.contextmanager
def exclusive(folder, waiting):
    """Holds `folder`'s lock while the block runs. Yields whether another process held
    it first; while it does, `waiting()` (a context manager) is entered."""
    if fcntl is None:
        yield False
        return
    with open(os.path.join(folder, LOCK), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            waited = False
        except BlockingIOError:
            with waiting():
                fcntl.flock(lock, fcntl.LOCK_EX)
            waited = True
        try:
            yield waited
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
