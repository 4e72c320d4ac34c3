"""The search space e = e0 + W z (Fei et al. 2023, sec. 3.2), z in R^d per token vector.

  pca:   W = the top-d principal directions of the token-embedding table, each scaled by the
         table's standard deviation along it, so z ~ N(0, I) moves e the way the vocabulary
         varies. (The reference code maps z with scikit-learn's inverse_transform, which also adds
         the vocabulary mean; here z = 0 gives e0 exactly.)
  prior: W with N(0, s^2) entries, s = alpha * std(table) / (sqrt(d) * sigma): the random
         projection of black-box tuning (Sun et al. 2022, sec. 3.2), which makes W z with
         z ~ sigma * N(0, I) move each coordinate by about alpha * std(table).
  full:  W = I, z lives in the embedding space itself (d = D).
A token of several text encoders (SDXL: CLIP-L's columns, then CLIP-G's) gets a subspace per
encoder's table, side by side (a block-diagonal W, d per part), and a norm cap per part.
"""
import numpy as np

from .errors import EdgeTIError


def pca_basis(table, dim):
    """table [V, D] -> W [D, dim]: principal directions times their standard deviations."""
    V, D = table.shape
    if not 1 <= dim <= D:
        raise EdgeTIError(f"--dim {dim}: the pca subspace needs 1 <= dim <= {D}")
    centered = table - table.mean(axis=0, keepdims=True)          # (V, D)
    covariance = centered.T @ centered / (V - 1)                  # (D, D), in float64 below
    eigenvalues, eigenvectors = np.linalg.eigh(covariance.astype(np.float64))
    order = np.argsort(eigenvalues)[::-1][:dim]                   # largest variance first
    scale = np.sqrt(np.maximum(eigenvalues[order], 0.0))          # (dim,)
    return (eigenvectors[:, order] * scale).astype(np.float32)    # (D, dim)


def prior_basis(table, dim, sigma, alpha=1.0, seed=0):
    """table [V, D] -> W [D, dim] with N(0, s^2) entries, s = alpha std(table) / (sqrt(dim) sigma)."""
    std = alpha * float(table.std()) / (np.sqrt(dim) * sigma)
    return np.random.default_rng(seed).normal(0.0, std, (table.shape[1], dim)).astype(np.float32)


def basis(kind, table, dim, sigma, seed=0):
    """W [D, d] for `pca`, `prior` or `full`."""
    if kind == "pca":
        return pca_basis(table, dim)
    if kind == "prior":
        return prior_basis(table, dim, sigma, seed=seed)
    if kind == "full":
        return np.eye(table.shape[1], dtype=np.float32)
    raise EdgeTIError(f"unknown subspace {kind!r}: choose pca, prior or full")


def part_basis(kind, table, dims, sigma, parts, seed=0):
    """W [D, sum(dims)]: basis() of each part's columns of the table (parts: slices), dims[k] for part k,
    block-diagonal."""
    blocks = [basis(kind, table[:, cols], dim, sigma, seed=seed + k) for k, (cols, dim) in enumerate(zip(parts, dims))]
    W = np.zeros((table.shape[1], sum(b.shape[1] for b in blocks)), np.float32)
    at = 0
    for cols, block in zip(parts, blocks):
        W[cols, at:at + block.shape[1]] = block
        at += block.shape[1]
    return W


def max_row_norm(table):
    """The longest token embedding of the vocabulary: the cap of a learned vector's norm."""
    return float(np.linalg.norm(table, axis=1).max())


def with_anchor(candidates, anchor):
    """candidates [P, n, D] -> [P, n + 1, D]: ANCHOR [1, D] (the init word's embedding, never searched) as
    every candidate's last vector; None leaves them as they are."""
    if anchor is None:
        return candidates
    anchor = np.broadcast_to(np.asarray(anchor, np.float32)[None], (len(candidates),) + np.shape(anchor))
    return np.concatenate([np.asarray(candidates, np.float32), anchor], axis=1)


def embeddings_from_z(e0, W, z, max_norm=None, anchor=None):
    """e0 [n, D], W [D, d], z [P, n*d] -> candidates [P, n, D] = e0 + W z per vector; with max_norm,
    a vector longer than that is shortened to it (the search can then not leave the vocabulary's
    range of norms, where the text encoder was never trained; the direction is kept). max_norm is a
    number, or [(columns, cap), ...] to cap each text encoder's part of the vector on its own. With
    anchor [1, D], each candidate gets it as one more, last vector: [P, n + 1, D] (with_anchor)."""
    P = z.shape[0]
    n, d = e0.shape[0], W.shape[1]
    z = z.reshape(P, n, d)                                        # (P, n, d)
    e = e0[None] + np.einsum("pnd,Dd->pnD", z, W)                 # (P, n, D), float64
    caps = [] if max_norm is None else [(slice(None), max_norm)] if np.isscalar(max_norm) else max_norm
    for cols, cap in caps:
        norms = np.linalg.norm(e[..., cols], axis=-1, keepdims=True)         # (P, n, 1)
        e[..., cols] = e[..., cols] * np.minimum(1.0, cap / np.maximum(norms, 1e-30))
    return with_anchor(e.astype(np.float32), anchor)
