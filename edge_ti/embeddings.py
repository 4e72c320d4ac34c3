"""Embedding files: safetensors in the shapes diffusers, AUTOMATIC1111 and ComfyUI use.

We write the single-key format `{token: float32 [n, D]}`, which diffusers' load_textual_inversion,
AUTOMATIC1111 and ComfyUI all load; an SDXL token as those two write it, `{"clip_l": [n, 768],
"clip_g": [n, 1280]}` (diffusers loads it with one load_textual_inversion call per text encoder:
README). We read:
  - diffusers: `{token: [n, D] or [D]}` (learned_embeds.safetensors)
  - AUTOMATIC1111 safetensors: `{"emb_params": [n, D]}` (the token is the file's name)
  - AUTOMATIC1111 / ComfyUI SDXL: `{"clip_l": [n, 768], "clip_g": [n, 1280]}` -> {token: {"clip_l": ...,
    "clip_g": ...}}; Model.check_embeddings joins the parts for SDXL and takes clip_l for SD 1.x
    (as ComfyUI does); a file with clip_l alone reads as an SD 1.x token
The token is the file's stem where the file does not name it (as those tools do), or `token=`.
Pickled `.pt` / `.bin` files are never unpickled here: `edge-ti convert` (export extra) turns them
into safetensors.
"""
import json
import math
import os
import stat
import struct

import numpy as np
from safetensors.numpy import save

from .errors import EdgeTIError
from .files import atomic_path
from .tokenizer import check_token

# safetensors dtype -> (numpy dtype, bytes per item); BF16 is decoded by hand (no torch)
_DTYPES = {"F32": (np.float32, 4), "F16": (np.float16, 2), "F64": (np.float64, 8), "BF16": (None, 2)}
_GENERIC_KEYS = ("emb_params", "string_to_param.*", "*")
MAX_FILE_BYTES = 1 << 30      # embeddings and checkpoints are kilobytes to megabytes: refuse to read more
MAX_VECTORS = 75              # CLIP's 77 positions minus BOS and EOS: a token with more cannot fit a prompt


def _corrupt(path, why):
    return EdgeTIError(f"{path}: not a valid safetensors file ({why})")


def _is_count(x):
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_safetensors(path, dtypes=("F32", "F16", "F64", "BF16")):
    """Our own small reader of a hostile file: ({name: array in its own dtype}, {str: str} metadata).

    Every field of the JSON header is checked before it is used, so a crafted header is a one-line
    EdgeTIError, never a traceback or a huge allocation; bf16 is read without torch.
    """
    try:
        info = os.stat(path)
    except OSError as err:
        raise EdgeTIError(f"{path}: cannot read ({err.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise EdgeTIError(f"{path}: not a regular file")
    if info.st_size > MAX_FILE_BYTES:
        raise EdgeTIError(f"{path}: {info.st_size} bytes is too large for an embedding or checkpoint")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise EdgeTIError(f"{path}: cannot read ({err.strerror})") from None
    # a safetensors file is an 8-byte header length, then a JSON header starting with "{";
    # torch.save writes a zip archive ("PK\3\4") or a bare pickle ("\x80" + protocol byte)
    if raw[8:9] != b"{" and (raw[:4] == b"PK\x03\x04" or raw[:1] == b"\x80"):
        raise EdgeTIError(f"{path}: a pickled torch file; edge-ti never unpickles, convert it with "
                          f"`edge-ti convert {path}` (needs pip install 'edge-ti[export]')")
    if len(raw) < 8:
        raise _corrupt(path, "too short")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if header_len > len(raw) - 8:
        raise _corrupt(path, f"header length {header_len} > file size")
    try:
        header = json.loads(raw[8:8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise _corrupt(path, "unreadable header") from None
    if not isinstance(header, dict):
        raise _corrupt(path, f"the header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, "__metadata__ must map strings to strings")
    data = memoryview(raw)[8 + header_len:]
    tensors = {}
    for key, entry in header.items():
        if not isinstance(entry, dict):
            raise _corrupt(path, f"entry {key!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _DTYPES:
            raise EdgeTIError(f"{path}: tensor {key!r} has dtype {str(dtype)[:20]}; expected float "
                              f"({', '.join(dtypes)})")
        if dtype not in dtypes:
            raise EdgeTIError(f"{path}: tensor {key!r} has dtype {dtype}; expected {', '.join(dtypes)}")
        if not (isinstance(shape, list) and len(shape) <= 8 and all(_is_count(d) for d in shape)):
            raise _corrupt(path, f"tensor {key!r} has shape {str(shape)[:40]}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise _corrupt(path, f"tensor {key!r} has data_offsets {str(offsets)[:40]}")
        numpy_dtype, itemsize = _DTYPES[dtype]
        begin, end = offsets
        count = math.prod(shape)  # Python ints: no overflow for a crafted huge shape
        if not begin <= end <= len(data) or end - begin != itemsize * count:
            raise _corrupt(path, f"tensor {key!r} does not match its data (truncated?)")
        chunk = data[begin:end]
        if dtype == "BF16":  # bf16 is the top half of a float32
            array = (np.frombuffer(chunk, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            array = np.frombuffer(chunk, numpy_dtype)
        tensors[key] = array.reshape(shape)
    return tensors, metadata


def check_vectors(token, vectors, source, width=None):
    """A token's vectors as float32 [n, D], or a one-line error: 1..75 finite rows of the right width."""
    vectors = np.array(vectors, dtype=np.float32)  # a copy: the file's buffer is read-only
    if vectors.ndim == 1:
        vectors = vectors[None]  # diffusers writes a one-vector token as [D]
    if vectors.ndim != 2 or vectors.shape[1] == 0:
        raise EdgeTIError(f"{source}: token {token!r} has shape {list(vectors.shape)}, expected [n, D]")
    if width is not None and vectors.shape[1] != width:
        raise EdgeTIError(f"{source}: token {token!r} has shape {list(vectors.shape)}, "
                          f"but this model's text encoder needs [n, {width}]")
    if not 1 <= len(vectors) <= MAX_VECTORS:
        raise EdgeTIError(f"{source}: token {token!r} has {len(vectors)} vectors; a token needs 1 to "
                          f"{MAX_VECTORS} (a prompt holds 75 tokens)")
    if not np.all(np.isfinite(vectors)):
        raise EdgeTIError(f"{source}: token {token!r} has NaN or infinite values")
    return vectors


SDXL_KEYS = ("clip_l", "clip_g")


def load_embedding(path, token=None):
    """An embedding file -> {token: float32 [n, D]}, or for an SDXL file {token: {"clip_l": [n, D_l],
    "clip_g": [n, D_g]}}; TOKEN names the placeholder (default: the file's own name for it, else its stem)."""
    if not os.path.lexists(path):
        raise EdgeTIError(f"{path}: no such embedding file")
    if token is not None:
        check_token(token, path)
    tensors, _ = read_safetensors(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    if "clip_g" in tensors:
        extra = sorted(set(tensors) - set(SDXL_KEYS))
        if "clip_l" not in tensors or extra:
            raise EdgeTIError(f"{path}: an SDXL embedding holds clip_l and clip_g, found keys {sorted(tensors)[:5]}")
        name = token or stem
        parts = {key: check_vectors(f"{name}:{key}", tensors[key], path) for key in SDXL_KEYS}
        if len(parts["clip_l"]) != len(parts["clip_g"]):
            raise EdgeTIError(f"{path}: {len(parts['clip_l'])} clip_l vectors but {len(parts['clip_g'])} clip_g "
                              "vectors; each of a token's vectors has both parts")
        return {name: parts}
    if "clip_l" in tensors:  # ComfyUI's layout of an SD 1.x token
        tensors = {stem: tensors["clip_l"]}
    elif any(k in tensors for k in _GENERIC_KEYS):
        key = next(k for k in _GENERIC_KEYS if k in tensors)
        tensors = {stem: tensors[key]}
    if len(tensors) != 1:
        raise EdgeTIError(f"{path}: expected one token's embedding, found keys {sorted(tensors)[:5]}")
    name, vectors = next(iter(tensors.items()))
    name = token or name
    if not name.strip():
        raise EdgeTIError(f"{path}: the token's name is empty")
    return {name: check_vectors(name, vectors, path)}


def read_metadata(path):
    """The file's safetensors metadata (str -> str); edge-ti records the training init there."""
    return read_safetensors(path)[1]


def save_embedding(path, embeddings, metadata=None):
    """{token: [n, D]} -> safetensors {token: float32 [n, D]}; {token: {"clip_l": .., "clip_g": ..}} (SDXL,
    Model.file_parts) -> {"clip_l": .., "clip_g": ..}; written atomically.

    metadata: extra str -> str entries (other tools ignore them; an SDXL file's token is its name).
    """
    if len(embeddings) != 1:
        raise EdgeTIError(f"{path}: an embedding file holds one token, got {len(embeddings)}")
    token, vectors = next(iter(embeddings.items()))
    if isinstance(vectors, dict):
        if sorted(vectors) != sorted(SDXL_KEYS):
            raise EdgeTIError(f"{path}: an SDXL token has parts clip_l and clip_g, got {sorted(vectors)}")
        tensors = {key: np.ascontiguousarray(check_vectors(f"{token}:{key}", vectors[key], path)) for key in SDXL_KEYS}
        if len(tensors["clip_l"]) != len(tensors["clip_g"]):
            raise EdgeTIError(f"{path}: token {token!r} has {len(tensors['clip_l'])} clip_l but "
                              f"{len(tensors['clip_g'])} clip_g vectors")
    else:
        tensors = {token: np.ascontiguousarray(check_vectors(token, vectors, path))}
    data = save(tensors, metadata={"format": "pt", "written_by": "edge-ti", **(metadata or {})})
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # Python's write: a full disk is an OSError
        f.write(data)
