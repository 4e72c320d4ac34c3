"""Output files: atomic writes, refusal to replace what is not ours, and an advisory lock.

A crash or Ctrl-C at any point leaves either the old file or the new one, never half of one:
the new content goes to a temp file in the same folder (`.tmp-<pid>-*`), renamed over the target
on success. A target that exists and is not a regular file (a symlink, a device, a FIFO, a
folder) is refused, so `--out /dev/null` cannot replace the device. Temp files whose process is
gone (a kill -9 during a write) are removed the next time that folder is written to.
"""
import contextlib
import os
import re
import shutil
import stat
import tempfile

from .errors import EdgeTIError

_UMASK = os.umask(0)
os.umask(_UMASK)
_TEMP = re.compile(r"^\.tmp-(\d+)-")


def check_output_path(path, what="output"):
    """Refuse a target that exists and is not a regular file, or a folder we cannot write in.

    Called before long work, so that a bad --out is found in a second, not after hours.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        info = None
    except OSError as err:
        raise EdgeTIError(f"{path}: cannot use as {what} ({err.strerror})") from None
    if info is not None and not stat.S_ISREG(info.st_mode):
        kind = ("a folder" if stat.S_ISDIR(info.st_mode) else "a symbolic link" if stat.S_ISLNK(info.st_mode)
                else "not a regular file")
        raise EdgeTIError(f"{path}: {kind}; edge-ti writes only regular files (choose another {what} path)")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise EdgeTIError(f"{path}: {folder} is not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".tmp-{os.getpid()}-")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise EdgeTIError(f"{path}: cannot write in {folder} ({err.strerror})") from None


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temps(folder):
    """Remove `.tmp-<pid>-*` files and folders left in FOLDER by processes that no longer run."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        match = _TEMP.match(name)
        if not match or int(match.group(1)) == os.getpid() or _process_alive(int(match.group(1))):
            continue
        stale = os.path.join(folder, name)
        with contextlib.suppress(OSError):
            if os.path.isdir(stale) and not os.path.islink(stale):
                shutil.rmtree(stale)
            else:
                os.remove(stale)


def temp_name(folder, suffix="", directory=False):
    """A new temp file (or folder) in FOLDER whose name carries our pid, for remove_stale_temps."""
    prefix = f".tmp-{os.getpid()}-"
    if directory:
        return tempfile.mkdtemp(dir=folder, prefix=prefix)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    os.close(fd)
    return tmp


@contextlib.contextmanager
def atomic_path(path):
    """with atomic_path(p) as tmp: write tmp -> tmp becomes p (mode as a plain open() would give).

    Refuses to replace anything but a regular file; a write that fails (full disk, file-size
    limit, read-only folder) is one EdgeTIError naming PATH, and leaves no temp file.
    """
    check_output_path(path)
    folder = os.path.dirname(os.path.abspath(path))
    remove_stale_temps(folder)
    suffix = os.path.splitext(path)[1]  # keep the extension: some writers pick the format by it
    tmp = temp_name(folder, suffix)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)
        check_output_path(path)  # still not a special file: nothing swapped one in while we wrote
        os.replace(tmp, path)
    except OSError as err:
        raise EdgeTIError(f"{path}: cannot write ({err.strerror or err})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class FileLock:
    """An exclusive advisory lock on PATH (created if absent) for as long as the `with` lasts.

    Two `edge-ti train` runs on one --out would each think the checkpoint theirs: the second is
    refused with one line. flock is released by the kernel when a process dies, so a killed run
    leaves no stale lock; the lock file is removed when the lock is released.
    """

    def __init__(self, path, what):
        self.path, self.what, self.fd = path, what, None

    def __enter__(self):
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
            if not _try_lock(fd):
                os.close(fd)
                raise EdgeTIError(f"{self.path}: another edge-ti process is using {self.what}; wait for it "
                                  "to finish or stop it")
            # the file may have been removed by its previous holder between our open and our lock
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return self
            os.close(fd)

    def __exit__(self, *exc):
        with contextlib.suppress(OSError):
            os.remove(self.path)
        os.close(self.fd)  # closing releases the lock


def _try_lock(fd):
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
