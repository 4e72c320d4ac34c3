"""The gradient baseline: diffusers' textual inversion (examples/textual_inversion/textual_inversion.py).

    python -m edge_ti_export.gradient_ti DIFFUSERS_DIR IMAGES... --token "<c>" --init-word triangle \
        --out c.safetensors [--max-steps 3000] [--max-time 60] [--batch 4] [--lr 5e-4] [--seed 0]

What edge-ti is measured against (benchmarks/quality.py), on the same model folder and images.
The recipe of the script, step by step:
1. add the placeholder token(s) `<c>`, `<c>_1`, ... to the tokenizer, resize the text encoder's
   token-embedding table, initialize the new rows from the init word (a word of several BPE
   tokens is averaged, as edge_ti.init.from_word does; the script accepts single-token words only);
2. freeze the VAE, the UNet and the text encoder except its token-embedding table; AdamW on that
   table (the script's betas 0.9/0.999, weight decay 1e-2, eps 1e-8, constant learning rate,
   lr = 5e-4 x batch size with --scale_lr);
3. each step: a batch of concept images, each flipped with p = 0.5, VAE latents
   `latent_dist.sample() * scaling_factor`, a prompt per image from the object or style templates
   (edge_ti.train's, which are the script's), noise, uniform timesteps, DDPM's q(x_t | x_0);
   loss = MSE(unet(x_t, t, text(prompt)), eps) (or v for v-prediction models);
4. after the optimizer step every row but the placeholders' is restored from a copy (weight decay
   would otherwise move the whole table).
One shortcut that changes no number's distribution: the VAE's latent distribution (mean, std) of
every image and of its mirror image is computed once, and each step samples from it, where the
script runs the VAE encoder on every batch (the encoder is deterministic; only the sample is random).
Images are center-cropped and resized exactly as edge_ti.latents does.
"""
import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from edge_ti.latents import load_images
from edge_ti.train import OBJECT_TEMPLATES, STYLE_TEMPLATES

TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


@dataclass
class GradientSettings:
    vectors: int = 1              # vectors per token (the script's --num_vectors)
    template: str = "object"      # object or style prompt templates (--learnable_property)
    batch: int = 4                # images per step (--train_batch_size; the script's default is 16)
    lr: float = 5e-4              # the script's --learning_rate, before scaling
    scale_lr: bool = True         # lr x batch size, as --scale_lr (with one process, no accumulation)
    weight_decay: float = 1e-2    # the script's --adam_weight_decay (applies to the token rows only)
    max_steps: int = 3000         # the script's --max_train_steps default 5000; stop earlier on max_time
    max_time: float = None        # seconds of training loop; None for no limit
    seed: int = 0
    flip: bool = True             # random horizontal flip, p = 0.5 (the script's --flip_p 0.5)
    threads: int = 1              # torch threads: the benchmark gives onnxruntime the same number
    anchor: bool = False          # one more vector after the learned ones, the init word's, kept (not trained)
    norm_cap: bool = False        # after each step, shorten a token row longer than the vocabulary's longest row to
                                  # it (projected gradient descent): edge-ti's cap, to measure what it costs


@dataclass
class Snapshot:
    elapsed: float                # seconds of training loop when taken
    step: int
    samples: int                  # UNet forward+backward samples so far (steps x batch)
    embedding: np.ndarray         # float32 [n, D], the placeholder rows


@dataclass
class GradientResult:
    embedding: dict               # {token: float32 [n, D]}
    init: np.ndarray              # float32 [n, D]
    steps: int
    samples: int                  # UNet forward+backward samples: steps x batch
    elapsed: float                # seconds of training loop (model loading and latents excluded)
    setup_seconds: float          # loading the pipeline and encoding the concept images
    losses: list                  # the training loss of every step
    snapshots: list = field(default_factory=list)


def placeholder_tokens(token, vectors):
    """`<c>` with n vectors is `<c> <c>_1 ... <c>_{n-1}` (the script's and edge_ti.tokenizer's names)."""
    return [token] + [f"{token}_{j}" for j in range(1, vectors)]


def load_components(diffusers_dir):
    """The tokenizer, text encoder, VAE, UNet and DDPM noise scheduler of a diffusers folder."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return {
        "tokenizer": CLIPTokenizer.from_pretrained(os.path.join(diffusers_dir, "tokenizer")),
        "text_encoder": CLIPTextModel.from_pretrained(os.path.join(diffusers_dir, "text_encoder")),
        "vae": AutoencoderKL.from_pretrained(os.path.join(diffusers_dir, "vae")),
        "unet": UNet2DConditionModel.from_pretrained(os.path.join(diffusers_dir, "unet")),
        # the training schedule, whatever sampler the folder's scheduler was saved for (the script's line)
        "noise_scheduler": DDPMScheduler.from_pretrained(os.path.join(diffusers_dir, "scheduler")),
    }


def add_placeholder(components, token, init_word=None, init_embedding=None, vectors=1):
    """Step 1: new token rows, initialized; -> their ids [n] (consecutive, after the vocabulary)."""
    tokenizer, text_encoder = components["tokenizer"], components["text_encoder"]
    names = placeholder_tokens(token, vectors)
    added = tokenizer.add_tokens(names)
    if added != vectors:
        raise ValueError(f"the tokenizer already contains {token!r}: choose another placeholder")
    ids = tokenizer.convert_tokens_to_ids(names)
    text_encoder.resize_token_embeddings(len(tokenizer))
    table = text_encoder.get_input_embeddings().weight.data               # (V + n, D)
    with torch.no_grad():
        if init_embedding is not None:
            init = torch.as_tensor(np.asarray(init_embedding, np.float32)).reshape(-1, table.shape[1])
            table[ids] = init if len(init) == vectors else init[:1].repeat(vectors, 1)
        else:
            word_ids = tokenizer.encode(init_word, add_special_tokens=False)
            if not word_ids:
                raise ValueError(f"init word {init_word!r} has no tokens")
            table[ids] = table[word_ids].mean(dim=0, keepdim=True).repeat(vectors, 1)  # (n, D)
    return ids


def prompt_ids(tokenizer, prompts):
    """prompts -> int64 [B, 77] as the script tokenizes them (max_length padding, truncation)."""
    return tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


def denoising_loss(components, input_ids, latents, noise, timesteps):
    """MSE(unet(x_t, t, text(ids)), target) over the batch: the script's loss, as one number.

    input_ids int64 [B, 77], latents / noise float32 [B, C, h, w], timesteps int64 [B].
    """
    noise_scheduler = components["noise_scheduler"]
    hidden = components["text_encoder"](input_ids)[0]                      # (B, 77, D)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)           # x_t = sqrt(a) x0 + sqrt(1-a) eps
    pred = components["unet"](noisy, timesteps, hidden).sample             # (B, C, h, w)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def latent_distribution(vae, pixels, batch=16):
    """pixels float32 [N, 3, H, W] in [-1, 1] -> (mean, std) [N, C, h, w] of the VAE's latent_dist."""
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, len(pixels), batch):
            dist = vae.encode(torch.from_numpy(pixels[start:start + batch])).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def train(diffusers_dir, images, token, init_word=None, init_embedding=None, settings=None,
          snapshot_times=(), snapshot_steps=(), on_step=None, components=None):
    """Learn TOKEN from IMAGES (files, folders or PIL images) with AdamW on its token rows.

    snapshot_times (seconds of training loop) and snapshot_steps: the placeholder rows are copied
    when the loop first passes each of them (GradientResult.snapshots; the final rows are always
    the last snapshot). on_step(record, rows) is called after every step with rows float32 [n, D].
    """
    settings = settings or GradientSettings()
    if settings.template not in TEMPLATES:
        raise ValueError(f"unknown template {settings.template!r}: choose object or style")
    setup_start = time.perf_counter()
    torch.set_num_threads(settings.threads)
    torch.set_flush_denormal(True)  # denormal Adam moments slow small CPU models badly
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    components = components or load_components(diffusers_dir)
    tokenizer, text_encoder = components["tokenizer"], components["text_encoder"]
    vae, unet, noise_scheduler = components["vae"], components["unet"], components["noise_scheduler"]
    T_train = noise_scheduler.config.num_train_timesteps

    # 1. the placeholder rows
    n_vectors = settings.vectors + settings.anchor
    ids = add_placeholder(components, token, init_word, init_embedding, n_vectors)
    placeholder_string = " ".join(placeholder_tokens(token, n_vectors))
    table = text_encoder.get_input_embeddings().weight                     # (V + n, D)
    original = table.detach().clone()
    keep = torch.ones(len(tokenizer), dtype=torch.bool)                   # rows restored after each step
    keep[min(ids):max(ids) + 1] = False
    if settings.anchor:  # the anchor row is restored with the vocabulary's: it stays the init word's
        keep[ids[-1]] = True
    init = original[ids].numpy().copy()                                   # (n, D)
    max_norm = float(original[:min(ids)].norm(dim=1).max())               # the vocabulary's longest row

    # 2. freeze all but the token-embedding table; AdamW on it
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    text_encoder.text_model.encoder.requires_grad_(False)
    text_encoder.text_model.final_layer_norm.requires_grad_(False)
    text_encoder.text_model.embeddings.position_embedding.requires_grad_(False)
    table.requires_grad_(True)
    unet.train()          # as the script (no dropout in these models)
    text_encoder.train()
    lr = settings.lr * settings.batch if settings.scale_lr else settings.lr
    optimizer = torch.optim.AdamW([table], lr=lr, betas=(0.9, 0.999), weight_decay=settings.weight_decay, eps=1e-8)

    # 3. the concept images, crop/resize as edge_ti.latents; the latent distribution of each image
    #    and (with flip) of its mirror, computed once
    resolution = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)  # as edge_ti.model
    pixels = load_images(images, resolution, flip=settings.flip)          # (2N or N, 3, H, W)
    n_images = len(pixels) // 2 if settings.flip else len(pixels)
    mean, std = latent_distribution(vae, pixels)                           # (2N or N, C, h, w) each
    scaling = float(vae.config.scaling_factor)
    templates = TEMPLATES[settings.template]
    setup_seconds = time.perf_counter() - setup_start

    losses, snapshots = [], []
    times, steps = sorted(snapshot_times), set(snapshot_steps)
    elapsed, step = 0.0, 0
    start = time.perf_counter()
    while step < settings.max_steps and not (settings.max_time and elapsed >= settings.max_time):
        B = settings.batch
        image = torch.randint(0, n_images, (B,), generator=generator)
        if settings.flip:  # the mirror of image i is row N + i
            image = image + n_images * (torch.rand(B, generator=generator) < 0.5).long()
        eps_vae = torch.randn(mean[image].shape, generator=generator)
        latents = (mean[image] + std[image] * eps_vae) * scaling           # latent_dist.sample() * scale
        prompts = [templates[int(k)].format(placeholder_string)
                   for k in torch.randint(0, len(templates), (B,), generator=generator)]
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, T_train, (B,), generator=generator).long()
        loss = denoising_loss(components, prompt_ids(tokenizer, prompts), latents, noise, timesteps)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():  # 4. every row but the placeholders' back to the original
            table[keep] = original[keep]
            if settings.norm_cap:  # the learned rows back onto the ball edge-ti's search stays in
                norms = table[ids].norm(dim=1, keepdim=True)
                table[ids] = table[ids] * torch.clamp(max_norm / norms, max=1.0)
        step += 1
        elapsed = time.perf_counter() - start
        losses.append(float(loss.detach()))
        rows = None
        while times and elapsed >= times[0]:
            times.pop(0)
            rows = rows if rows is not None else table.detach()[ids].numpy().copy()
            snapshots.append(Snapshot(elapsed, step, step * B, rows))
        if step in steps:
            rows = rows if rows is not None else table.detach()[ids].numpy().copy()
            snapshots.append(Snapshot(elapsed, step, step * B, rows))
        if on_step:
            on_step({"step": step, "loss": losses[-1], "elapsed": elapsed},
                    rows if rows is not None else table.detach()[ids].numpy().copy())

    final = table.detach()[ids].numpy().copy()                            # (n, D)
    if not snapshots or snapshots[-1].step != step:
        snapshots.append(Snapshot(elapsed, step, step * settings.batch, final))
    return GradientResult(embedding={token: final}, init=init, steps=step, samples=step * settings.batch,
                          elapsed=elapsed, setup_seconds=setup_seconds, losses=losses, snapshots=snapshots)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("diffusers_dir")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--token", default="<concept>")
    parser.add_argument("--init-word", required=True)
    parser.add_argument("--out", required=True, help="the embedding file (.safetensors)")
    types = {"template": str, "lr": float, "weight_decay": float, "max_time": float}
    for f in dataclasses.fields(GradientSettings):  # every setting is a flag: --max-steps 1000 ...
        if isinstance(f.default, bool):
            parser.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction,
                                default=f.default)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), type=types.get(f.name, int), default=f.default)
    args = parser.parse_args(argv)
    settings = GradientSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(GradientSettings)})
    result = train(args.diffusers_dir, args.images, args.token, init_word=args.init_word, settings=settings)
    from edge_ti.embeddings import save_embedding
    save_embedding(args.out, result.embedding, metadata={
        "edge_ti.init": json.dumps(result.init.tolist()), "edge_ti.init_word": args.init_word,
        "edge_ti.method": "gradient (diffusers textual_inversion.py recipe)"})
    print(f"{result.steps} steps ({result.samples} samples) in {result.elapsed:.1f} s, "
          f"final loss {np.mean(result.losses[-50:]):.4f} (mean of the last 50) -> {args.out}")


if __name__ == "__main__":
    main()
