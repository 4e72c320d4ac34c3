"""CLIP-I and CLIP-T: how close generated images are to the concept, and to their prompts; and
Spearman's rho, how alike two rankings of the same candidates are.

As the textual inversion literature measures them (Gal et al. 2022; DreamBooth names them CLIP-I, CLIP-T):
CLIP-I is the mean cosine similarity over all pairs (generated image, concept image) of CLIP
image features; CLIP-T is the mean cosine similarity of each generated image with the CLIP text
features of its own prompt. Both run on MODEL_DIR/clip/ (edge_ti.clip), without torch.
Images are uint8 arrays [N, H, W, 3], PIL images or paths.
"""
import numpy as np

from .clip import clip_model, image_list
from .errors import EdgeTIError


def clip_i(model, generated_images, concept_images):
    """Mean pairwise cosine of CLIP image features, generated x concept (the diagonal included)."""
    g = clip_model(model).image_features(generated_images)  # (N, P), unit rows
    c = clip_model(model).image_features(concept_images)  # (M, P), unit rows
    return float((g @ c.T).mean())  # mean of the (N, M) cosines


def clip_t(model, generated_images, prompts):
    """Mean cosine of each generated image with its prompt (one prompt, or one per image).

    Give the prompts as CLIP should read them: the placeholder token means nothing to CLIP,
    so replace it by the class word or drop it ("a photo of <my-mug> on a beach" -> "a photo of
    a mug on a beach"; Gal et al. remove it).
    """
    images = image_list(generated_images)
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(images):
        raise EdgeTIError(f"clip_t: {len(images)} images but {len(prompts)} prompts")
    g = clip_model(model).image_features(images)  # (N, P), unit rows
    t = clip_model(model).text_features(prompts)  # (N, P), unit rows
    return float(np.sum(g * t, axis=1).mean())  # mean of the N cosines


def spearman(a, b):
    """Spearman's rank correlation (no ties in continuous losses): Pearson of the ranks."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])
