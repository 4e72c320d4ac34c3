"""The cache folder: where derived files go, how they are keyed, what a failed write says.

Everything edge-ti derives from a model (patched text encoder, optimized graphs, latents) is keyed
by `fingerprint`: a hash of the WHOLE content of a model part, so a file edited anywhere gets new
cache entries. Hashing a 3 GB UNet takes seconds, so each file's digest is remembered in
cache_root()/digests.json under (path, size, mtime_ns, inode) and the file is read again only
when one of those changes.
"""
import hashlib
import json
import logging
import os
import time

from .errors import EdgeTIError
from .files import atomic_path

log = logging.getLogger(__name__)

# the model's own text files: configs and tokenizers do not change a part's weights
NOT_WEIGHTS = (".json", ".txt", ".md")
# a file modified this recently may change again within the same mtime tick (coarse on Linux):
# its digest is not remembered, as git does for "racily clean" files
RECENT_NS = 2_000_000_000


def cache_root():
    """EDGE_TI_CACHE, else ~/.cache/edge-ti."""
    return os.environ.get("EDGE_TI_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "edge-ti")


def cache_error(folder, err):
    """The one-line error for a failed cache write (an OSError, or what failed): it is the cache's
    disk, not the model."""
    reason = err.strerror or err if isinstance(err, OSError) else err
    return EdgeTIError(f"{folder}: cannot write the cache ({reason}): the disk is full or the folder "
                       "is not writable; set EDGE_TI_CACHE to another folder")


def _index_path():
    return os.path.join(cache_root(), "digests.json")


def _read_index():
    try:
        with open(_index_path(), encoding="utf-8") as f:
            index = json.load(f)
        return index if isinstance(index, dict) else {}
    except (OSError, ValueError):  # none yet, or damaged: digests are recomputed
        return {}


def _remember(path, stamp, digest):
    # read again just before writing: another process may have added entries meanwhile
    index = _read_index()
    index[path] = [*stamp, digest]
    try:
        with atomic_path(_index_path()) as tmp, open(tmp, "w", encoding="utf-8") as f:
            json.dump(index, f)
    except (OSError, EdgeTIError) as err:  # the index only saves time: the digest itself is right
        log.info("cannot remember the digest of %s (%s)", path, err)


def file_digest(path):
    """sha256 of a file's whole content, read once per (path, size, mtime_ns, inode)."""
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
    except OSError as err:
        raise EdgeTIError(f"{path}: {err.strerror}") from None
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    known = _read_index().get(path)
    if known and known[:3] == stamp:
        return known[3]
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    except OSError as err:
        raise EdgeTIError(f"{path}: cannot read it ({err.strerror})") from None
    if time.time_ns() - st.st_mtime_ns > RECENT_NS:
        _remember(path, stamp, digest.hexdigest())
    return digest.hexdigest()


def fingerprint(model_file):
    """sha256 over the model file and every weight file beside it (all but configs), whole content.

    An optimum export keeps a large UNet's weights in model.onnx_data next to a small graph file:
    two fine-tunes of one architecture have the same graph file, so the weights must be in the key.
    """
    folder = os.path.dirname(os.path.abspath(model_file))
    if not os.path.isfile(model_file):
        raise EdgeTIError(f"{model_file}: no such file")
    names = sorted(n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n))
                   and not n.endswith(NOT_WEIGHTS))
    digest = hashlib.sha256()
    for name in names:
        digest.update(f"{name}:{file_digest(os.path.join(folder, name))}\n".encode())
    return digest.hexdigest()
