"""Where a shapes-world model loses a fill pattern (issue 15): the VAE, or the UNet at which noise level.

    python benchmarks/shapes_patterns.py export/shapes_diffusers            # the shipped model, ~5 min on 2 cores
    python benchmarks/shapes_patterns.py /work/runs/NAME/diffusers --n 60

Three tables, each read back by edge_ti/shapes/analyzer.py, per pattern (solid, striped, dotted), on
images of trained attribute combinations with that pattern:
1. prompted: DDIM 25 steps, guidance 4, the full caption: what `shapes_train --evaluate` measures,
   split by pattern, with what the analyzer read instead (the confusions);
2. the VAE: decoded posterior means with Gaussian noise of std s added in the scaled latent space
   (how exact must the UNet's latents be for the decoder to draw the pattern?);
3. img2img from the clean drawing at strength 0.1 ... 0.75 (diffusers' StableDiffusionImg2ImgPipeline,
   DDIM 25, guidance 4, the full caption): the drawing noised to t ~ strength x 1000, then denoised.
   A pattern kept at low strength and lost at higher ones is lost by the UNet at those noise levels.
Runs in torch (diffusers' pipelines): a diagnostic of the model, not of the runtime.
"""
import argparse
import collections
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

STRENGTHS = (0.1, 0.25, 0.5, 0.75)
LATENT_NOISE = (0.0, 0.1, 0.2, 0.3)


def pattern_images(pattern, n, seed):
    from edge_ti.shapes import draw as world
    rng = np.random.default_rng(seed)
    attributes = [world.sample_attributes(rng, pattern=pattern) for _ in range(n)]
    return attributes, np.stack([world.draw(a, rng) for a in attributes])     # [n, 32, 32, 3]


def to_uint8(images):
    """float [n, H, W, 3] in [0, 1] -> uint8."""
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("diffusers_dir", help="a StableDiffusionPipeline folder (shapes_train's DIR/diffusers)")
    parser.add_argument("--n", type=int, default=60, help="images per pattern (default 60)")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.diffusers_dir, "model_index.json")):
        parser.error(f"{args.diffusers_dir}: no model_index.json (not a diffusers pipeline folder)")
    if args.n < 1:
        parser.error("--n must be at least 1")

    import torch
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
    from PIL import Image

    from edge_ti.shapes import analyzer
    from edge_ti.shapes import draw as world

    torch.set_num_threads(args.threads)
    img2img = StableDiffusionImg2ImgPipeline.from_pretrained(args.diffusers_dir, safety_checker=None,
                                                            requires_safety_checker=False)
    img2img.scheduler = DDIMScheduler.from_config(img2img.scheduler.config)
    img2img.set_progress_bar_config(disable=True)
    text2img = StableDiffusionPipeline(**img2img.components)
    text2img.set_progress_bar_config(disable=True)
    vae, scaling = img2img.vae, img2img.vae.config.scaling_factor

    rows = collections.defaultdict(dict)
    for pattern in world.PATTERNS:
        attributes, images = pattern_images(pattern, args.n, args.seed)
        captions = [world.caption(a) for a in attributes]

        def read(generated):
            return float(np.mean([analyzer.analyze(g)["pattern"] == pattern for g in generated]))

        prompted = to_uint8(np.concatenate([
            text2img(c, num_inference_steps=25, guidance_scale=4.0, output_type="np",
                     generator=torch.Generator().manual_seed(args.seed * 1000 + i)).images
            for i, c in enumerate(captions)]))
        rows[pattern]["prompted"] = read(prompted)
        rows[pattern]["read as"] = dict(collections.Counter(analyzer.analyze(g)["pattern"] for g in prompted))

        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1      # [n, 3, 32, 32]
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean * scaling                          # [n, 4, 8, 8]
            for s in LATENT_NOISE:
                noisy = z + s * torch.randn(z.shape, generator=torch.Generator().manual_seed(args.seed))
                decoded = (vae.decode(noisy / scaling).sample.permute(0, 2, 3, 1).numpy() + 1) / 2
                rows[pattern][f"vae s={s}"] = read(to_uint8(decoded))
        for strength in STRENGTHS:
            out = to_uint8(np.concatenate([
                img2img(c, image=Image.fromarray(images[i]), strength=strength, num_inference_steps=25,
                        guidance_scale=4.0, output_type="np",
                        generator=torch.Generator().manual_seed(args.seed * 1000 + i)).images
                for i, c in enumerate(captions)]))
            rows[pattern][f"img2img {strength}"] = read(out)
        print(f"{pattern}: {rows[pattern]}", file=sys.stderr, flush=True)

    columns = ["prompted"] + [f"vae s={s}" for s in LATENT_NOISE] + [f"img2img {s}" for s in STRENGTHS]
    print(f"\n{args.diffusers_dir}: pattern read back by the analyzer, {args.n} images per pattern")
    print("| pattern | " + " | ".join(columns) + " | prompted, read as |")
    print("|---" * (len(columns) + 2) + "|")
    for pattern, row in rows.items():
        print(f"| {pattern} | " + " | ".join(f"{row[c]:.2f}" for c in columns) + f" | {row['read as']} |")


if __name__ == "__main__":
    main()
