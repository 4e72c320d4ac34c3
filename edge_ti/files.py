"""Output files: atomic writes, refusal to replace what is not ours, and an advisory lock.

A crash or Ctrl-C at any point leaves either the old file or the new one, never half of one:
the new content goes to a temp file in the same folder (`.tmp-<pid>@<host>~*`), renamed over the
target on success. A target that exists and is not a regular file (a symlink, a device, a FIFO,
a folder) is refused, so `--out /dev/null` cannot replace the device. Temp files whose process is
gone (a kill -9 during a write) are removed the next time that folder is written to; the host is
in the name so that machines sharing a folder (a Ray cluster's cache on NFS) leave each other's alone.
"""
import contextlib
import os
import re
import shutil
import socket
import stat
import tempfile

from .errors import EdgeTIError

_UMASK = os.umask(0)
os.umask(_UMASK)
_HOST = socket.gethostname().replace("~", "_").replace(os.sep, "_")
_TEMP = re.compile(r"^\.tmp-(\d+)@([^~]*)~")


def _temp_prefix():
    return f".tmp-{os.getpid()}@{_HOST}~"


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
    # the folder, or the nearest folder above it that exists (the run will create the rest)
    folder = existing = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise EdgeTIError(f"{path}: {existing} is not a folder")
    try:  # a probe file: permissions, read-only mounts and full disks all show here
        fd, probe = tempfile.mkstemp(dir=existing, prefix=_temp_prefix())
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
    """Remove temp files and folders left in FOLDER by processes of this machine that no longer run."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        match = _TEMP.match(name)
        if not match or match.group(2) != _HOST:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _process_alive(pid):
            continue
        stale = os.path.join(folder, name)
        with contextlib.suppress(OSError):
            if os.path.isdir(stale) and not os.path.islink(stale):
                shutil.rmtree(stale)
            else:
                os.remove(stale)


def temp_name(folder, suffix="", directory=False):
    """A new temp file (or folder) in FOLDER whose name carries our pid, for remove_stale_temps."""
    prefix = _temp_prefix()
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
    suffix = os.path.splitext(path)[1]  # keep the extension: some writers pick the format by it
    try:
        os.makedirs(folder, exist_ok=True)
        remove_stale_temps(folder)
        tmp = temp_name(folder, suffix)
    except OSError as err:
        raise EdgeTIError(f"{path}: cannot write ({err.strerror or err})") from None
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


@contextlib.contextmanager
def atomic_folder(path, exist_ok=False):
    """with atomic_folder(p) as tmp: fill the folder tmp -> it becomes p, whole, or nothing does.

    The temp folder sits beside P (a rename within one file system) and carries our pid, so a
    killed process's leftovers are removed by the next write there. exist_ok: P appearing meanwhile
    (another process filling the same cache entry) is success, not an error.
    """
    if os.path.lexists(path) and not exist_ok:
        raise EdgeTIError(f"{path}: already exists; choose a new output folder")
    with scratch_folder(os.path.dirname(os.path.abspath(path))) as tmp:
        yield tmp
        try:
            os.rename(tmp, path)
        except OSError:
            if not (exist_ok and os.path.isdir(path)):  # not another process winning the race
                raise


@contextlib.contextmanager
def scratch_folder(parent):
    """A temp folder in PARENT (beside the output it helps make: same disk), removed on exit."""
    try:
        os.makedirs(parent, exist_ok=True)
        remove_stale_temps(parent)
        tmp = temp_name(parent, directory=True)
    except OSError as err:
        raise EdgeTIError(f"{parent}: cannot write ({err.strerror or err})") from None
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class FileLock:
    """An exclusive advisory lock on PATH (created if absent) for as long as the `with` lasts.

    Two `edge-ti train` runs on one --out would each think the checkpoint theirs: the second is
    refused with one line. flock is released by the kernel when a process dies, so a killed run
    leaves no stale lock; the lock file is removed when the lock is released, and so are the
    folders made for it if nothing else was written there (a run refused early leaves nothing).
    """

    def __init__(self, path, what):
        self.path, self.what, self.fd, self.made = path, what, None, []

    def __enter__(self):
        folder = os.path.dirname(os.path.abspath(self.path))
        while not os.path.lexists(folder):
            self.made.append(folder)
            folder = os.path.dirname(folder)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        try:
            return self._lock()
        except BaseException:
            self._remove_made()
            raise

    def _lock(self):
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
        self._remove_made()

    def _remove_made(self):
        for folder in self.made:  # deepest first; stops at the first that holds something
            try:
                os.rmdir(folder)
            except OSError:
                break


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
