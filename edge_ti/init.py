"""Where the search starts: e0, the initial embedding of the new token.

`from_word`: the word's token embeddings (several BPE tokens are averaged), as diffusers'
textual-inversion script initializes from `--initializer_token`.
"""
import numpy as np

from .errors import EdgeTIError


def from_word(model, word, vectors=1):
    """e0 [vectors, D]: the mean of WORD's token-embedding rows, repeated for each vector."""
    ids = model.tokenizer.token_ids(word)
    if not ids:
        raise EdgeTIError(f"--init-word {word!r} has no tokens")
    e0 = model.token_embeddings[ids].mean(axis=0)          # (D,)
    return np.tile(e0[None], (vectors, 1)).astype(np.float32)  # (n, D)
