"""Pickled embeddings (.pt / .bin from diffusers or AUTOMATIC1111) -> safetensors.

Unpickling runs code from the file, so it happens only here, with torch's weights_only loader,
and never in the runtime.
"""
import os

import torch

from edge_ti.embeddings import save_embedding
from edge_ti.errors import EdgeTIError


def read_pickled_embedding(path):
    """diffusers learned_embeds.bin {token: [D]} or A1111 .pt {"string_to_param": {"*": [n, D]}, "name"}."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, ... for bad files
        raise EdgeTIError(f"{path}: cannot load it as a torch embedding ({str(err).splitlines()[0]})") from None
    stem = os.path.splitext(os.path.basename(path))[0]
    if isinstance(data, dict) and "string_to_param" in data:  # AUTOMATIC1111
        params = data["string_to_param"]
        token = data.get("name") or stem
        tensor = next(iter(params.values()))
    elif isinstance(data, dict) and len(data) == 1 and torch.is_tensor(next(iter(data.values()))):
        token, tensor = next(iter(data.items()))  # diffusers
    else:
        raise EdgeTIError(f"{path}: not a diffusers or AUTOMATIC1111 embedding")
    return {token: tensor.detach().float().reshape(-1, tensor.shape[-1]).numpy()}


def convert(path, out=None):
    """Write PATH's embedding as safetensors next to it (or to OUT); returns the output path."""
    out = out or os.path.splitext(path)[0] + ".safetensors"
    save_embedding(out, read_pickled_embedding(path))
    return out
