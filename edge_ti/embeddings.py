"""Embedding files: safetensors in the shapes diffusers, AUTOMATIC1111 and ComfyUI use.

We write the single-key format `{token: float32 [n, D]}`, which diffusers' load_textual_inversion,
AUTOMATIC1111 and ComfyUI all load. We read:
  - diffusers: `{token: [n, D] or [D]}` (learned_embeds.safetensors)
  - AUTOMATIC1111 safetensors: `{"emb_params": [n, D]}` (the token is the file's name)
  - ComfyUI / SDXL: `{"clip_l": [n, 768], "clip_g": [n, 1280]}` (SD 1.x uses clip_l)
Pickled `.pt` / `.bin` files are never unpickled here: `edge-ti convert` (export extra) turns them
into safetensors.
"""
import json
import os
import struct

import numpy as np
from safetensors.numpy import save_file

from .errors import EdgeTIError
from .files import atomic_path

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": None}
_GENERIC_KEYS = ("emb_params", "string_to_param.*", "*")


def _read_safetensors(path, with_metadata=False):
    """Our own small reader: a clear error for any corruption, and bf16 without torch."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise EdgeTIError(f"{path}: cannot read ({err.strerror})") from None
    # a safetensors file is an 8-byte header length, then a JSON header starting with "{";
    # torch.save writes a zip archive ("PK\3\4") or a bare pickle ("\x80" + protocol byte)
    if raw[8:9] != b"{" and (raw[:4] == b"PK\x03\x04" or raw[:1] == b"\x80"):
        raise EdgeTIError(f"{path}: a pickled torch file; edge-ti never unpickles, convert it with "
                          f"`edge-ti convert {path}` (needs pip install 'edge-ti[export]')")
    if len(raw) < 8:
        raise EdgeTIError(f"{path}: not a safetensors file (too short)")
    (header_len,) = struct.unpack("<Q", raw[:8])
    if header_len > len(raw) - 8:
        raise EdgeTIError(f"{path}: not a safetensors file (header length {header_len} > file size)")
    try:
        header = json.loads(raw[8:8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise EdgeTIError(f"{path}: not a safetensors file (unreadable header)") from None
    data = memoryview(raw)[8 + header_len:]
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise EdgeTIError(f"{path}: corrupt safetensors header entry for {key!r}") from None
        if dtype not in _DTYPES:
            raise EdgeTIError(f"{path}: tensor {key!r} has dtype {dtype}; embeddings must be float")
        itemsize = 2 if dtype == "BF16" else np.dtype(_DTYPES[dtype]).itemsize
        if not 0 <= begin <= end <= len(data) or end - begin != itemsize * int(np.prod(shape)):
            raise EdgeTIError(f"{path}: corrupt safetensors file (tensor {key!r} is truncated)")
        chunk = data[begin:end]
        if dtype == "BF16":  # bf16 is the top half of a float32
            array = (np.frombuffer(chunk, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            array = np.frombuffer(chunk, _DTYPES[dtype])
        tensors[key] = array.reshape(shape).astype(np.float32)
    if with_metadata:
        return tensors, header.get("__metadata__") or {}
    return tensors


def load_embedding(path):
    """An embedding file -> {token: float32 [n, D]}."""
    if not os.path.isfile(path):
        raise EdgeTIError(f"{path}: no such embedding file")
    tensors = _read_safetensors(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    if "clip_l" in tensors:  # ComfyUI/SDXL layout; SD 1.x reads the CLIP-L part
        tensors = {stem: tensors["clip_l"]}
    elif any(k in tensors for k in _GENERIC_KEYS):
        key = next(k for k in _GENERIC_KEYS if k in tensors)
        tensors = {stem: tensors[key]}
    if len(tensors) != 1:
        raise EdgeTIError(f"{path}: expected one token's embedding, found keys {sorted(tensors)}")
    token, vectors = next(iter(tensors.items()))
    if vectors.ndim == 1:
        vectors = vectors[None]  # diffusers writes a one-vector token as [D]
    if vectors.ndim != 2:
        raise EdgeTIError(f"{path}: token {token!r} has shape {list(vectors.shape)}, expected [n, D]")
    return {token: vectors}


def read_metadata(path):
    """The file's safetensors metadata (str -> str); edge-ti records the training init there."""
    return _read_safetensors(path, with_metadata=True)[1]


def save_embedding(path, embeddings, metadata=None):
    """{token: [n, D]} -> safetensors {token: float32 [n, D]}, written atomically.

    metadata: extra str -> str entries (other tools ignore them).
    """
    if len(embeddings) != 1:
        raise EdgeTIError(f"{path}: an embedding file holds one token, got {len(embeddings)}")
    token, vectors = next(iter(embeddings.items()))
    vectors = np.ascontiguousarray(np.atleast_2d(np.asarray(vectors, dtype=np.float32)))
    with atomic_path(path) as tmp:
        save_file({token: vectors}, tmp, metadata={"format": "pt", "written_by": "edge-ti", **(metadata or {})})
