"""Train the shapes-world model: a small Stable Diffusion (and a tiny CLIP) on edge_ti.shapes images.

    python -m edge_ti_export.shapes_train --out DIR --seed 0          # train, save, export
    python -m edge_ti_export.shapes_train --evaluate edge_ti/shapes/model  # prompt accuracy only

Writes DIR/diffusers/ (a StableDiffusionPipeline folder), DIR/clip/ (a transformers CLIPModel
folder), DIR/onnx/ (optimum's ONNX layout with clip/ inside: what ships as edge_ti/shapes/model)
and DIR/train.log. Same seed, same weights (on the same torch build, device and thread count);
--device cuda runs the same recipe on a GPU (the same random draws, other rounding).

The recipe is the one of diffusers' train_text_to_image.py shrunk to 32 px:
1. draw a fixed training set with edge_ti.shapes.draw (the HELD_OUT combinations never appear);
2. the VAE (AutoencoderKL, 32 -> 8x8x4) on reconstruction + a small KL term; its
   scaling_factor makes the scaled latents of the training set unit-variance (as SD's 0.18215);
   with --vae-decoder-steps N, N more steps of the decoder alone (the encoder frozen, so the latents,
   and a UNet trained on them, stay valid: as SD's ft-MSE VAE); with --vae DIR the VAE of an earlier run
   (the shipped model's decoder: --vae OLD --init-from OLD_DIFFUSERS --unet-steps 0 --vae-decoder-steps 1500);
   with --vae-precision bf16 both VAE stages run under bfloat16 autocast (faster on AVX512-BF16 / AMX CPUs);
   with --vae-schedule cosine the joint stage's learning rate decays to 10% at --vae-max-steps;
3. the CLIP BPE tokenizer: the 256 byte symbols, every caption word and a few hundred common
   English words fully merged (so `--init-word` and a PCA over the vocabulary mean something);
4. the text encoder (CLIPTextModel) and the UNet (UNet2DConditionModel with cross-attention)
   jointly, v-prediction (as SD 2.x; epsilon is an option) under the DDPM scaled_linear schedule,
   10% empty captions for classifier-free guidance (Ho & Salimans 2022), and an EMA of the weights
   that is saved; with --caption-template-p P a share P of the captions is set in textual inversion's
   prompt templates ("a photo of a ...", "... in the style of ...": templated_caption), as SD's training
   captions are phrased every which way, so that the words of edge-ti's prompts mean nothing to the image; with --text-encoder clip, the UNet alone, conditioned on stage 5's CLIP text tower
   (trained first, then frozen: SD 1.x conditions on CLIP ViT-L/14's), so that a candidate token
   has a CLIP score (edge_ti.clip_score);
5. optionally a tiny CLIP (ViT 32 px / text) trained contrastively on images and captions
   (Radford et al. 2021, the symmetric InfoNCE loss), for `--init auto` and CLIP metrics; with
   --clip-text locked its text tower is stage 4's text encoder, frozen (the shipped model's: then its
   tokens have a CLIP score, which `edge-ti train` climbs before its search);
6. export through optimum (edge_ti_export.onnx_export.export_pipeline) and check the ONNX folder:
   generations of full captions, read back by edge_ti.shapes.analyzer, per attribute.
"""
import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from edge_ti.runtime import cpu_has_bf16
from edge_ti.shapes import analyzer
from edge_ti.shapes import draw as world
from edge_ti.train import OBJECT_TEMPLATES, STYLE_TEMPLATES

log = logging.getLogger("shapes_train")

# Common English words beside the caption words: a vocabulary to search and to initialize from.
COMMON_WORDS = """
the of and to in is it you that he was for on are with as his they be at one have this from or had by
not word but what some we can out other were all there when up use your how said an each she which do
their time if will way about many then them write would like so these her long make thing see him two
has look more day could go come did number sound no most people my over know water than call first who
may down side been now find any new work part take get place made live where after back little only
round man year came show every good me give our under name very through just form sentence great think
say help low line differ turn cause much mean before move right boy old too same tell does set three
want air well also play home read hand port large spell add even land here must high such follow act
why ask men change went light kind off need house picture try us again animal point mother world near
build self earth father head stand own page should country found answer school grow study still learn
plant cover food sun four between state keep eye never last let thought city tree cross farm hard
start might story saw far sea draw left late run while press close night real life few north open seem
together next white children begin got walk example ease paper group always music those both mark often
letter until mile river car feet care second book carry took science eat room friend began idea fish
mountain stop once base hear horse cut sure watch color face wood main enough plain girl usual young
ready above ever red list though feel talk bird soon body dog family direct pose leave song measure door
product black short numeral class wind question happen complete ship area half rock order fire south
problem piece told knew pass since top whole king space heard best hour better true during hundred five
remember step early hold west ground interest reach fast verb sing listen six table travel less morning
ten simple several vowel toward war lay against pattern slow center love person money serve appear road
map rain rule govern pull cold notice voice unit power town fine certain fly fall lead cry dark machine
note wait plan figure star box noun field rest correct able pound done beauty drive stood contain front
teach week final gave green quick develop ocean warm free minute strong special mind behind clear tail
produce fact street inch multiply nothing course stay wheel full force blue object decide surface deep
moon island foot system busy test record boat common gold possible plane stead dry wonder laugh thousand
ago ran check game shape equate hot miss brought heat snow tire bring yes distant fill east paint
language among photo painting drawing style art image small big round bright cat mug cup ball toy
""".split()


@dataclasses.dataclass
class TrainConfig:
    seed: int = 0
    threads: int = 1               # torch threads: on 2 shared cores one thread was faster than two
    n_images: int = 20000          # fixed training set: ~8 images per allowed attribute combination
    caption_drop_p: float = 0.2    # each attribute left out of a caption with this probability
    # share of captions set in one of textual inversion's prompt templates (templated_caption): "a photo of
    # a ...", "... in the style of dotted, black background"; 0 leaves every caption bare, as before
    caption_template_p: float = 0.0
    # VAE: 3 blocks (32, 64, 64) -> 8x8x4, ~1M parameters
    vae_max_steps: int = 8000      # 1-2 s of one shared core per step (417 s on a GPU); training stops earlier when...
    vae_target: float = 0.98       # ...the analyzer reads all six attributes of this share of reconstructions
    vae_check_every: int = 1000    # steps between those checks (200 images of the whole world)
    vae_batch: int = 64            # 2400 steps of 32 (the first model's VAE) left stripes and dots at 0.93
    vae_lr: float = 2e-3           # after a 50-step warmup, constant (the stopping step is not known ahead)...
    vae_schedule: str = "constant" # ...or "cosine" to 10% at --vae-max-steps: 4000 cosine steps + the decoder's 1500
                                   # reconstruct patterns 0.976-0.984, 3500 constant ones 0.949-0.961 (models.md)
    vae_fg_weight: float = 3.0     # loss weight of shape pixels against background ones
    vae_kl: float = 1e-6           # small: a near-deterministic autoencoder; scaling_factor fixes the scale
    vae_decoder_steps: int = 0     # then the decoder alone, the encoder frozen (finetune_decoder): the latents stay
    vae_decoder_lr: float = 5e-4   # cosine from this, 50 steps of warmup
    # "bf16": both VAE stages under torch.autocast(bfloat16) (the loss and the weights stay float32): 1.3x
    # faster per step on a Sapphire Rapids-class Xeon with AMX (0.69 against 0.89 s per step of 64, 2
    # threads; its GroupNorms stay float32 and take a third of a step); emulated and slower without
    vae_precision: str = "fp32"
    # text encoder: CLIPTextModel, hidden 64, 3 layers
    text_hidden: int = 64
    text_layers: int = 3
    # UNet: (64, 128) with cross-attention in both levels, one layer per block
    unet_channels: tuple = (64, 128)
    unet_layers_per_block: int = 1
    unet_steps: int = 3000         # 0.9-1.7 s of one shared core per step: 45-85 min
    unet_batch: int = 64
    unet_lr: float = 1e-3
    warmup: int = 100
    max_loss_weight: float = 1.0   # cap of the 1 + 1/SNR loss weight on the eps error; 1 = off (20 with
                                   # epsilon left position at chance: benchmarks/results/shapes_sweep.md)
    # the UNet's regression target: v (Salimans & Ho 2022) weighs the high-noise steps, where only the
    # caption can say where the shape goes, like the x0 error; with epsilon (the first model) those
    # steps weigh ~SNR ~ 0.01 and "left" / "right" were ignored (position 0.33 = chance, 1.00 with v)
    prediction_type: str = "v_prediction"
    zero_snr: int = 0              # 1: betas rescaled to zero terminal SNR and "trailing" sampling steps
                                   # (Lin et al. 2024): at t = T the input holds no trace of the image
    uncond_p: float = 0.1          # empty caption: the unconditional branch of guidance
    ema_decay: float = 0.998       # EMA of UNet + text encoder weights, warmed up as (1+t)/(10+t)
    # "own": a text encoder trained with the UNet; "clip": the tiny CLIP's text tower, trained first and
    # frozen, as SD 1.x conditions on CLIP ViT-L/14's (then a candidate token also has a CLIP score)
    text_encoder: str = "own"
    # the tiny CLIP's text tower: "own" (trained with its image tower) or "locked": the model's text
    # encoder, frozen, with only the image tower and the projections trained (LiT, Zhai et al. 2022,
    # with the text side locked), so that the model's tokens have a CLIP score as SD 1.x's do
    clip_text: str = "own"
    # tiny CLIP for --init auto and metrics (0 steps: none)
    clip_steps: int = 400
    clip_batch: int = 128
    clip_lr: float = 1e-3
    clip_dim: int = 64
    # the check after export
    eval_prompts: int = 100        # per group (trained combinations, held-out ones)
    eval_steps: int = 25
    eval_guidance: float = 4.0
    device: str = "cpu"            # torch device of the VAE and UNet stages (cuda: same recipe, not the same bits)


# ---------------------------------------------------------------- data
def make_dataset(n, seed, drop_p):
    """(images uint8 [n, 32, 32, 3], attributes, a caption sampler) of the fixed training set."""
    rng = np.random.default_rng(seed)
    attributes = [world.sample_attributes(rng) for _ in range(n)]
    images = np.stack([world.draw(a, rng) for a in attributes])               # [n, 32, 32, 3]
    return images, attributes


# textual inversion's prompt templates (edge_ti.train), less those that name a size ("a photo of the small {}"):
# sizes are caption words of this world, and such a template would contradict the image it captions
_SIZE_WORDS = set(world.ATTRIBUTES["size"]) | {"large"}
CAPTION_OBJECT_TEMPLATES = [t for t in OBJECT_TEMPLATES if not _SIZE_WORDS & set(t.split())]
CAPTION_STYLE_TEMPLATES = [t for t in STYLE_TEMPLATES if not _SIZE_WORDS & set(t.split())]
_STYLE_NOUNS = ("painting", "picture", "rendering", "rendition")  # the subject of each style template


def templated_caption(attributes, rng, drop_p, template_p):
    """world.caption(attributes, rng, drop_p), set with probability template_p in a template as SD's users and
    textual inversion phrase prompts, so that the model reads "a photo of a ..." as a model trained on real
    captions does, instead of meeting those words first in edge-ti's prompts. Two times in three an object
    template around the caption ("a close-up photo of a small striped red star on the left, black background"),
    else a style template whose style is the caption's pattern, background and (half the time) colour:
    "a small red star on the left in the style of striped, black background", or with no subject but the
    template's own ("a dark painting in the style of striped, black background") half the time.
    template_p = 0 draws from rng exactly as world.caption does (earlier recipes' captions are unchanged)."""
    if template_p <= 0:
        return world.caption(attributes, rng, drop_p=drop_p)
    keep = {name: value for name, value in attributes.items()        # world.caption's drop, the same draws
            if value is not None and not (drop_p > 0 and rng.random() < drop_p)}
    if rng.random() >= template_p:
        return world.caption(keep)
    style_names = ["pattern", "background"] + (["color"] if rng.random() < 0.5 else [])
    style = {n: keep[n] for n in ("pattern", "color", "background") if n in keep and n in style_names}
    if rng.random() < 2 / 3 or not style:
        template = CAPTION_OBJECT_TEMPLATES[rng.integers(len(CAPTION_OBJECT_TEMPLATES))]
        return template.format(world.caption(keep)[len("a "):])
    template = CAPTION_STYLE_TEMPLATES[rng.integers(len(CAPTION_STYLE_TEMPLATES))]
    words = " ".join(style[n] for n in ("pattern", "color") if n in style)
    if "background" in style:
        words = (words + ", " if words else "") + f"{style['background']} background"
    if rng.random() < 0.5:  # the subject: the caption's other attributes ("small red star on the left")
        subject = world.caption({n: v for n, v in keep.items() if n not in style})[len("a "):]
        noun = next(n for n in _STYLE_NOUNS if n in template.split())
        template = template.replace(noun, subject, 1)
    return template.format(words)


def to_tensor(images):
    """uint8 [n, H, W, 3] -> float32 [n, 3, H, W] in [-1, 1] (diffusers' VAE convention)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


# ---------------------------------------------------------------- tokenizer
def _bpe(symbols, ranks):
    """CLIP's BPE on one word's symbols: merge the lowest-ranked adjacent pair until none is left."""
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == math.inf:
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def write_tokenizer(out_dir, words):
    """vocab.json + merges.txt in CLIP's format where each of `words` is one token; a CLIPTokenizer.

    Words are merged in order: a word that the merges so far split into pieces gets new merges
    (appended, so of the lowest priority) joining its pieces left to right. Earlier words never
    change: their symbols are already single tokens when a later merge could apply.
    """
    from transformers import CLIPTokenizer

    from edge_ti_export.tiny import bytes_to_unicode

    byte_map = bytes_to_unicode()
    symbols = [byte_map[b] for b in range(256)]
    vocab = symbols + [s + "</w>" for s in symbols]
    merges, ranks = [], {}
    for word in dict.fromkeys(words):
        chars = [byte_map[b] for b in word.encode("utf-8")]
        pieces = _bpe(chars[:-1] + [chars[-1] + "</w>"], ranks)
        cur = pieces[0]
        for piece in pieces[1:]:
            ranks[(cur, piece)] = len(merges)
            merges.append((cur, piece))
            cur = cur + piece
            vocab.append(cur)
    vocab = list(dict.fromkeys(vocab)) + ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tokenizer = CLIPTokenizer(os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "merges.txt"),
                              model_max_length=77)
    for word in words:  # every word is one token, with its end-of-word mark
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, f"{word!r} tokenizes into {len(ids)} tokens"
    return tokenizer


def vocabulary_words():
    """The caption words first (they get the shortest merge chains), then the common words."""
    return [w for w in world.caption_words() if w != ","] + [",", *COMMON_WORDS]


class CaptionIds:
    """Captions -> int64 [B, 77] as the pipeline tokenizes them, memoized (there are few distinct ones)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, captions):
        for c in captions:
            if c not in self.cache:
                self.cache[c] = self.tokenizer(c, padding="max_length", max_length=77, truncation=True).input_ids
        return torch.tensor([self.cache[c] for c in captions], dtype=torch.long)


# ---------------------------------------------------------------- models
def make_vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=world.SIZE,
                         down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                         block_out_channels=[32, 64, 64], layers_per_block=1, norm_num_groups=32)


def make_text_encoder(cfg, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel
    vocab = len(tokenizer)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab, hidden_size=cfg.text_hidden, intermediate_size=4 * cfg.text_hidden,
        num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=cfg.text_hidden))


def make_unet(cfg, latent_size):
    from diffusers import UNet2DConditionModel
    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=cfg.unet_layers_per_block, down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n, cross_attention_dim=cfg.text_hidden,
        attention_head_dim=4, norm_num_groups=32)


def make_scheduler(prediction_type="epsilon", zero_snr=False):
    # SD's schedule (scaled_linear 0.00085..0.012, 1000 steps), saved as the DDIM config SD ships;
    # zero_snr: as SD 2.1's successors fixed it (Lin et al. 2024, sec. 3.1 and 3.3)
    from diffusers import DDIMScheduler
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1, prediction_type=prediction_type,
                         rescale_betas_zero_snr=bool(zero_snr),
                         timestep_spacing="trailing" if zero_snr else "leading")


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def lr_at(step, total, base, warmup):
    """Linear warmup, then cosine decay to 10% of base."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------- training stages
def pixel_weights(x_all, fg_weight):
    """[N, 3, H, W] in [-1, 1] -> [N, 1, H, W] loss weights: pixels of the shape and around it (its pattern's holes
    included) weigh FG_WEIGHT: a shape covers 5-30% of an image, and a plain loss learns the background long before
    the shapes."""
    border = torch.cat([x_all[:, :, 0], x_all[:, :, -1], x_all[:, :, :, 0], x_all[:, :, :, -1]], dim=2)  # [N, 3, 128]
    bg = border.median(dim=2).values[..., None, None]                           # [N, 3, 1, 1]
    shape_px = ((x_all - bg).abs().amax(dim=1, keepdim=True) > 0.1).float()     # [N, 1, 32, 32]
    near = F.max_pool2d(shape_px, kernel_size=5, stride=1, padding=2)           # 2 px around: holes too
    return 1 + (fg_weight - 1) * near


def vae_check_set(seed):
    """(attributes, uint8 images [200, 32, 32, 3]) of the whole world, held-out pairs included: the VAE's checks."""
    rng = np.random.default_rng(seed + 1)
    attributes = [world.sample_attributes(rng, exclude=()) for _ in range(200)]
    return attributes, np.stack([world.draw(a, rng) for a in attributes])


def vae_autocast(cfg):
    """The VAE stages' forward passes in bfloat16 where cfg.vae_precision says so (weights, Adam and the loss
    stay float32: torch's mixed precision); a no-op context otherwise."""
    return torch.autocast(torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.vae_precision == "bf16")


def train_vae(cfg, images, gen):
    """AutoencoderKL on weighted L1 + MSE + cfg.vae_kl * KL, until the analyzer reads its reconstructions.

    Returns it in eval mode on cfg.device (scaling_factor is set afterwards, from the latents' std).
    Random draws come from `gen` on the CPU whatever the device: the same batches everywhere.
    """
    device = torch.device(cfg.device)
    vae = make_vae()
    # start near-deterministic: log-variance channels of the posterior at -6 (std 0.05) instead of
    # 0 (std 1), which buried the latents in noise and left the decoder drawing blobs for 500 steps
    with torch.no_grad():
        vae.quant_conv.bias[4:].fill_(-6.0)
    log.info("vae: %.2fM parameters", n_params(vae) / 1e6)
    if cfg.vae_precision == "bf16" and cfg.device == "cpu" and not cpu_has_bf16():
        log.warning("vae: --vae-precision bf16 on a CPU without AVX512-BF16 / AMX runs emulated, slower than fp32")
    vae.to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    x_all = to_tensor(images)                                                   # [N, 3, 32, 32]
    w_all = pixel_weights(x_all, cfg.vae_fg_weight)                            # [N, 1, 32, 32]
    check_attributes, check_images = vae_check_set(cfg.seed)
    t0 = time.time()
    for step in range(cfg.vae_max_steps):
        for group in opt.param_groups:
            group["lr"] = (lr_at(step, cfg.vae_max_steps, cfg.vae_lr, 50) if cfg.vae_schedule == "cosine"
                           else cfg.vae_lr * min(1.0, (step + 1) / 50))
        index = torch.randint(len(x_all), (cfg.vae_batch,), generator=gen)
        x, weight = x_all[index].to(device), w_all[index].to(device)            # [B, 3, 32, 32], [B, 1, 32, 32]
        with vae_autocast(cfg):
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(device)
            recon = vae.decode(z).sample                                        # [B, 3, 32, 32]
        error = recon.float() - x
        loss = (weight * (error.abs() + error ** 2)).mean() + cfg.vae_kl * posterior.kl().float().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            log.info("vae step %d loss %.4f (%.0f s)", step + 1, loss.item(), time.time() - t0)
        if (step + 1) % cfg.vae_check_every == 0:
            accuracy = analyzer.accuracy(reconstruct(vae.eval(), check_images), check_attributes)
            vae.train()
            log.info("vae step %d: analyzer on reconstructions %s", step + 1,
                     {k: round(v, 3) for k, v in accuracy.items()})
            if accuracy["all"] >= cfg.vae_target:
                break
    return vae.eval()


def finetune_decoder(cfg, vae, images, gen):
    """cfg.vae_decoder_steps more steps of train_vae's loss on the decoder alone, the encoder frozen: the latents
    (what the UNet learns to draw) stay exactly as they were, only how they are drawn in pixels improves (as SD's
    ft-MSE VAE, whose decoder alone was fine-tuned to stay a drop-in replacement). Cosine from cfg.vae_decoder_lr."""
    device = torch.device(cfg.device)
    vae.to(device).eval()
    vae.requires_grad_(False)
    decoder = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    for p in decoder:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(decoder, lr=cfg.vae_decoder_lr, weight_decay=0.0)
    x_all = to_tensor(images)                                                   # [N, 3, 32, 32]
    w_all = pixel_weights(x_all, cfg.vae_fg_weight)
    check_attributes, check_images = vae_check_set(cfg.seed)
    vae.decoder.train()
    t0 = time.time()
    for step in range(cfg.vae_decoder_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.vae_decoder_steps, cfg.vae_decoder_lr, 50)
        index = torch.randint(len(x_all), (cfg.vae_batch,), generator=gen)
        x, weight = x_all[index].to(device), w_all[index].to(device)            # [B, 3, 32, 32], [B, 1, 32, 32]
        with torch.no_grad(), vae_autocast(cfg):
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(device)
        with vae_autocast(cfg):
            recon = vae.decode(z).sample                                        # [B, 3, 32, 32]
        error = recon.float() - x
        loss = (weight * (error.abs() + error ** 2)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            log.info("vae decoder step %d loss %.4f (%.0f s)", step + 1, loss.item(), time.time() - t0)
    vae.eval().requires_grad_(False)
    accuracy = analyzer.accuracy(reconstruct(vae, check_images), check_attributes)
    log.info("vae decoder: %d steps; analyzer on reconstructions %s", cfg.vae_decoder_steps,
             {k: round(v, 3) for k, v in accuracy.items()})
    return vae


@torch.no_grad()
def reconstruct(vae, images):
    """uint8 [n, 32, 32, 3] -> uint8 [n, 32, 32, 3] through the posterior mean."""
    x = to_tensor(images).to(vae.device)
    recon = vae.decode(vae.encode(x).latent_dist.mean).sample                  # [n, 3, 32, 32]
    return ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def encode_all(vae, images, batch=500):
    """Posterior means and stds of the whole set: float32 [N, 4, 8, 8] each."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        posterior = vae.encode(to_tensor(images[i:i + batch]).to(vae.device)).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def ema_update(ema_params, params, decay):
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, params, alpha=1 - decay)


def train_unet(cfg, means, stds, scaling_factor, attributes, ids_of, tokenizer, gen, rng, stop_at=None,
               frozen_text_encoder=None, start=None):
    """Text encoder + UNet jointly on eps- or v-prediction; returns their EMA copies on the CPU.

    Random draws come from `gen` and `rng` on the CPU whatever cfg.device. stop_at: a time.time()
    after which training stops early (logged; the learning-rate schedule is not shortened).
    frozen_text_encoder: condition on this one, unchanged, instead of training one (returned as is).
    start: (text_encoder, unet) to continue from (their EMA starts there too) instead of new ones.
    """
    from diffusers import DDPMScheduler
    device = torch.device(cfg.device)
    if start is not None:
        text_encoder, unet = start
    else:
        text_encoder, unet = frozen_text_encoder or make_text_encoder(cfg, tokenizer), make_unet(cfg, means.shape[-1])
    text_encoder.requires_grad_(frozen_text_encoder is None)
    unet.requires_grad_(True)
    log.info("text encoder: %.2fM parameters, unet: %.2fM parameters",
             n_params(text_encoder) / 1e6, n_params(unet) / 1e6)
    noise_scheduler = DDPMScheduler.from_config(make_scheduler(cfg.prediction_type, cfg.zero_snr).config)
    # Loss weight per timestep (epsilon only; off by default): the eps error weighted as the
    # v-prediction loss weighs it, 1 + 1/SNR(t) (Salimans & Ho 2022, eq. 9 with
    # v = sqrt(a) eps - sqrt(1 - a) x0), capped at cfg.max_loss_weight and normalized to mean 1
    # over t. Capped at 20 it left position at chance; predicting v itself fixed it.
    alphas_cumprod = noise_scheduler.alphas_cumprod                            # [T]
    snr = alphas_cumprod / (1 - alphas_cumprod)                                 # [T]; 0 at T with zero_snr: 1/0, capped
    weights = (1 + 1 / snr).clamp(max=cfg.max_loss_weight)                      # [T]
    weights = (weights / weights.mean()).to(device)
    text_encoder.to(device)
    unet.to(device)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if frozen_text_encoder is None else [])
    ema_text, ema_unet = copy.deepcopy(text_encoder).eval(), copy.deepcopy(unet).eval()
    ema_params = list(ema_unet.parameters()) + (list(ema_text.parameters()) if frozen_text_encoder is None else [])
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    t0 = time.time()
    for step in range(cfg.unet_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.unet_steps, cfg.unet_lr, cfg.warmup)
        index = torch.randint(len(means), (cfg.unet_batch,), generator=gen)  # [B]
        # latents sampled from the VAE posterior, scaled to unit variance (SD's latents * 0.18215)
        latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=gen)) * scaling_factor
        latents = latents.to(device)
        captions = ["" if rng.random() < cfg.uncond_p
                    else templated_caption(attributes[i], rng, cfg.caption_drop_p, cfg.caption_template_p)
                    for i in index.tolist()]
        noise = torch.randn(latents.shape, generator=gen).to(device)            # [B, 4, 8, 8]
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (cfg.unet_batch,),
                                  generator=gen).to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)          # x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps
        if cfg.prediction_type == "v_prediction":                               # v = sqrt(a_t) eps - sqrt(1 - a_t) x_0
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        with torch.set_grad_enabled(frozen_text_encoder is None):
            hidden = text_encoder(ids_of(captions).to(device))[0]               # [B, 77, D]
        pred = unet(noisy, timesteps, hidden).sample                           # [B, 4, 8, 8]
        per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))                 # [B]
        loss = (weights[timesteps] * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema_params, params, min(cfg.ema_decay, (1 + step) / (10 + step)))
        if step % 50 == 0 or step == cfg.unet_steps - 1:
            log.info("unet step %d/%d loss %.4f (%.0f s)", step + 1, cfg.unet_steps, loss.item(), time.time() - t0)
        if stop_at is not None and time.time() > stop_at:
            log.warning("unet: out of time, stopped after step %d of %d", step + 1, cfg.unet_steps)
            break
    return ema_text.cpu(), ema_unet.cpu()


def train_clip(cfg, images, attributes, tokenizer, gen, rng, locked_text=None):
    """A tiny CLIPModel (ViT 32 px in 4 px patches, 2 layers each) on the symmetric InfoNCE loss.
    locked_text: a CLIPTextModel to be the text tower, frozen (only the image tower, both projections
    and the temperature learn); else a 2-layer text tower is trained with the image tower."""
    from transformers import CLIPConfig, CLIPModel
    vocab = len(tokenizer)
    text_config = dict(vocab_size=vocab, hidden_size=cfg.clip_dim, intermediate_size=4 * cfg.clip_dim,
                       num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    if locked_text is not None:
        text_config = locked_text.config.to_dict()
    vision_config = dict(hidden_size=cfg.clip_dim, intermediate_size=4 * cfg.clip_dim, num_attention_heads=4,
                         num_hidden_layers=2, image_size=world.SIZE, patch_size=4, num_channels=3)
    clip = CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=cfg.clip_dim))
    if locked_text is not None:
        clip.text_model.load_state_dict(locked_text.text_model.state_dict())
        clip.text_model.requires_grad_(False)
    log.info("clip: %.2fM parameters (%.2fM trained)", n_params(clip) / 1e6,
             sum(p.numel() for p in clip.parameters() if p.requires_grad) / 1e6)
    ids_of = CaptionIds(tokenizer)
    # CLIPImageProcessor's normalization (OpenAI's mean and std), as edge_ti.clip will apply it
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    pixels_all = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    opt = torch.optim.AdamW([p for p in clip.parameters() if p.requires_grad], lr=cfg.clip_lr, weight_decay=1e-2)
    t0 = time.time()
    for step in range(cfg.clip_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.clip_steps, cfg.clip_lr, 50)
        index = torch.randperm(len(images), generator=gen)[:cfg.clip_batch]
        captions = [templated_caption(attributes[i], rng, cfg.caption_drop_p, cfg.caption_template_p)
                    for i in index.tolist()]
        out = clip(input_ids=ids_of(captions), pixel_values=pixels_all[index], return_loss=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.clip_steps - 1:
            log.info("clip step %d/%d loss %.4f (%.0f s)", step + 1, cfg.clip_steps, out.loss.item(), time.time() - t0)
    return clip.eval()


def clip_text_encoder(clip):
    """The CLIPTextModel whose weights are CLIP's text tower (SD 1.x's text encoder is CLIP ViT-L/14's)."""
    from transformers import CLIPTextModel
    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.text_model.load_state_dict(clip.text_model.state_dict())
    return text_encoder.eval()


# ---------------------------------------------------------------- evaluation (numpy runtime)
def reconstruction_accuracy(model_dir, n=1000, seed=2000):
    """The analyzer on clean images and on their VAE reconstructions through the ONNX VAE.

    Images of the whole world (held-out combinations included); latents are the posterior means.
    Returns {"clean": {attribute: accuracy}, "vae": {...}}.
    """
    import edge_ti
    from edge_ti.generate import decode
    from edge_ti.latents import encode_images

    model = edge_ti.open_model(model_dir)
    rng = np.random.default_rng(seed)
    attributes = [world.sample_attributes(rng, exclude=()) for _ in range(n)]
    images = np.stack([world.draw(a, rng) for a in attributes])               # [n, 32, 32, 3]
    pixels = images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1      # [n, 3, 32, 32]
    recon = decode(model, encode_images(model, pixels, batch=100))             # [n, 32, 32, 3]
    return {"clean": analyzer.accuracy(images, attributes), "vae": analyzer.accuracy(recon, attributes)}


def check_attributes(n_prompts, seed):
    """The attribute sets of the prompted check: {"trained": [...], "held_out": [...]}, n_prompts each."""
    rng = np.random.default_rng(seed)

    def held_out():
        combo = world.HELD_OUT[rng.integers(len(world.HELD_OUT))]
        return world.sample_attributes(rng, exclude=(), **combo)

    return {"trained": [world.sample_attributes(rng) for _ in range(n_prompts)],
            "held_out": [held_out() for _ in range(n_prompts)]}


def prompt_accuracy(model_dir, n_prompts=100, steps=25, guidance=4.0, seed=1000):
    """One generation per full caption (edge_ti.generate, DDIM on onnxruntime), read back by the analyzer.

    Returns {"trained": {attribute: accuracy}, "held_out": {...}}: captions of attribute sets from
    the training distribution, and captions that contain one of HELD_OUT (the others drawn freely).
    """
    import edge_ti
    from edge_ti.generate import generate

    model = edge_ti.open_model(model_dir)
    results = {}
    for name, attributes in check_attributes(n_prompts, seed).items():
        images = np.concatenate([generate(model, world.caption(a), steps=steps, guidance=guidance,
                                          sampler="ddim", seed=seed + i, n=1)
                                 for i, a in enumerate(attributes)])               # [n_prompts, 32, 32, 3]
        results[name] = analyzer.accuracy(images, attributes)
    return results


def evaluate(model_dir, cfg):
    """Both checks, logged and returned."""
    t = time.time()
    recon = reconstruction_accuracy(model_dir)
    log.info("analyzer accuracy, clean: %s", json.dumps(recon["clean"]))
    log.info("analyzer accuracy, VAE reconstructions: %s", json.dumps(recon["vae"]))
    prompts = prompt_accuracy(model_dir, cfg.eval_prompts, cfg.eval_steps, cfg.eval_guidance)
    log.info("prompt accuracy (ddim %d steps, guidance %g, %d prompts per group): %s",
             cfg.eval_steps, cfg.eval_guidance, cfg.eval_prompts, json.dumps(prompts))
    log.info("evaluation: %.0f s", time.time() - t)
    return {"reconstruction": recon, "prompts": prompts,
            "settings": {"steps": cfg.eval_steps, "guidance": cfg.eval_guidance, "prompts": cfg.eval_prompts}}


# ---------------------------------------------------------------- main
def save_pipeline(out, vae, text_encoder, unet, tokenizer, cfg):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, unet=unet, tokenizer=tokenizer,
                                   scheduler=make_scheduler(cfg.prediction_type, cfg.zero_snr),
                                   safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out)
    return pipe


def save_clip(out, clip, tokenizer):
    from transformers import CLIPImageProcessor
    clip.save_pretrained(out)
    tokenizer.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": world.SIZE}, crop_size={"height": world.SIZE, "width": world.SIZE}
                       ).save_pretrained(out)


def _stage_random(seed):
    """Each stage starts from its own seed (torch's global one for its weights, a generator for its
    batches, a numpy one for its captions), so that reusing an earlier stage changes nothing later."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed), np.random.default_rng(seed)


def start_problem(diffusers_dir, cfg):
    """What makes an earlier run's diffusers/ folder unusable as --init-from for CFG, or None (configs only)."""
    configs = {}
    for part in ("unet", "text_encoder"):
        path = os.path.join(diffusers_dir, part, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                configs[part] = json.load(f)
        except (OSError, ValueError) as e:
            return f"--init-from {diffusers_dir}: no readable {part}/config.json ({type(e).__name__})"
    unet, text = configs["unet"], configs["text_encoder"]
    if tuple(unet.get("block_out_channels", ())) != tuple(cfg.unet_channels):
        return (f"--init-from {diffusers_dir}: its UNet's channels are {tuple(unet.get('block_out_channels', ()))}, "
                f"--unet-channels {cfg.unet_channels}")
    if (text.get("hidden_size"), text.get("num_hidden_layers")) != (cfg.text_hidden, cfg.text_layers):
        return f"--init-from {diffusers_dir}: its text encoder's width or depth is not --text-hidden / --text-layers"
    return None


def load_start(diffusers_dir, tokenizer):
    """(text_encoder, unet) of an earlier run's diffusers/ folder (start_problem checked it)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel
    text_encoder = CLIPTextModel.from_pretrained(os.path.join(diffusers_dir, "text_encoder"))
    if text_encoder.config.vocab_size != len(tokenizer):  # another --seed's or revision's vocabulary
        raise SystemExit(f"--init-from {diffusers_dir}: its text encoder has {text_encoder.config.vocab_size} "
                         f"tokens, this run's tokenizer {len(tokenizer)}")
    unet = UNet2DConditionModel.from_pretrained(os.path.join(diffusers_dir, "unet"))
    return text_encoder.train(), unet.train()


def train(out, cfg, vae_dir=None, init_from=None):
    """Every stage; returns the ONNX folder. vae_dir: skip the VAE stage, load that one instead.
    init_from: a diffusers/ folder of an earlier run whose text encoder and UNet training continues."""
    from edge_ti_export.onnx_export import export_pipeline
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)  # denormal Adam moments slowed early steps 10x on this CPU
    timings = {}
    t = time.time()

    images, attributes = make_dataset(cfg.n_images, cfg.seed, cfg.caption_drop_p)
    assert not any(world.is_held_out(a) for a in attributes)
    timings["data"] = time.time() - t
    log.info("data: %d images in %.0f s", len(images), timings["data"])

    tokenizer = write_tokenizer(os.path.join(out, "tokenizer-src"), vocabulary_words())
    log.info("tokenizer: %d tokens", len(tokenizer))

    t = time.time()
    if vae_dir:  # the VAE of an earlier run of this command with the same seed: the same weights
        from diffusers import AutoencoderKL
        vae = AutoencoderKL.from_pretrained(vae_dir).eval().to(cfg.device)
        log.info("vae: loaded from %s", vae_dir)
    else:
        vae = train_vae(cfg, images, *_stage_random(cfg.seed)[:1])
    if cfg.vae_decoder_steps:  # the encoder is frozen: the latents below are the same with or without it
        vae = finetune_decoder(cfg, vae, images, _stage_random(cfg.seed + 3)[0])
    means, stds = encode_all(vae, images)                                       # [N, 4, 8, 8] each
    scaling_factor = float(1 / means.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    timings["vae"] = time.time() - t
    log.info("vae: %.0f s; latent std %.4f -> scaling_factor %.4f", timings["vae"], means.std(), scaling_factor)
    vae.save_pretrained(os.path.join(out, "vae"))  # also inside diffusers/ later; here for early checks

    def clip_stage(locked_text=None):
        t = time.time()
        clip = train_clip(cfg, images, attributes, tokenizer, *_stage_random(cfg.seed + 2), locked_text=locked_text)
        timings["clip"] = time.time() - t
        save_clip(os.path.join(out, "clip"), clip, tokenizer)
        log.info("clip: %.0f s", timings["clip"])
        return clip

    clip = clip_stage() if cfg.text_encoder == "clip" else None  # trained first: the UNet reads its text tower
    t = time.time()
    start = load_start(init_from, tokenizer) if init_from else None
    if start:
        log.info("unet (+ text encoder): continuing from %s", init_from)
    text_encoder, unet = train_unet(cfg, means, stds, scaling_factor, attributes, CaptionIds(tokenizer),
                                    # a continuation draws other batches than the run it continues
                                    tokenizer, *_stage_random(cfg.seed + (11 if start else 1)),
                                    frozen_text_encoder=clip and clip_text_encoder(clip), start=start)
    timings["unet"] = time.time() - t
    log.info("unet (+ text encoder): %.0f s", timings["unet"])
    save_pipeline(os.path.join(out, "diffusers"), vae.cpu(), text_encoder, unet, tokenizer, cfg)
    if clip is None and cfg.clip_steps:
        clip = clip_stage(text_encoder if cfg.clip_text == "locked" else None)
    clip_dir = os.path.join(out, "clip") if clip is not None else None

    t = time.time()
    onnx_dir = export_pipeline(os.path.join(out, "diffusers"), os.path.join(out, "onnx"), clip_source=clip_dir)
    timings["export"] = time.time() - t
    log.info("export: %.0f s -> %s", timings["export"], onnx_dir)
    with open(os.path.join(out, "train.json"), "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), "vae_from": vae_dir, "init_from": init_from, "timings_s": timings,
                   "scaling_factor": scaling_factor,
                   "params": {"vae": n_params(vae), "text_encoder": n_params(text_encoder), "unet": n_params(unet)}},
                  f, indent=2)
    return onnx_dir


def _channels(text):
    """'64,128,128' -> (64, 128, 128): positive multiples of 32 (the UNet's GroupNorm has 32 groups)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or any(v <= 0 or v % 32 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated positive multiples of 32, e.g. 64,128,128")
    return values


_CHOICES = {"prediction_type": ("epsilon", "v_prediction"), "device": ("cpu", "cuda"), "text_encoder": ("own", "clip"),
            "clip_text": ("own", "locked"), "vae_precision": ("fp32", "bf16"),
            "vae_schedule": ("constant", "cosine")}


def recipe_problem(cfg, init_from=None):
    """What makes CFG's settings unusable together, or None."""
    if cfg.zero_snr and cfg.prediction_type == "epsilon":  # alpha_bar_T = 0: eps says nothing about x0 at T
        return "--zero-snr 1 needs --prediction-type v_prediction"
    if cfg.max_loss_weight != 1 and cfg.prediction_type != "epsilon":  # v's loss already weighs by 1 + 1/SNR
        return "--max-loss-weight weighs the epsilon loss: use it with --prediction-type epsilon"
    if cfg.text_encoder == "clip" and (cfg.clip_steps <= 0 or cfg.clip_dim != cfg.text_hidden):
        return "--text-encoder clip needs --clip-steps > 0 and --clip-dim equal to --text-hidden (the UNet reads its width)"
    if cfg.text_encoder == "clip" and cfg.clip_text == "locked":
        return "--clip-text locked gives the CLIP the model's own text encoder: not with --text-encoder clip"
    if cfg.clip_text == "locked" and cfg.clip_steps <= 0:
        return "--clip-text locked trains a CLIP: it needs --clip-steps > 0"
    if init_from and cfg.text_encoder == "clip":
        return "--init-from continues a run that trained its own text encoder: not with --text-encoder clip"
    if not 0 <= cfg.caption_template_p <= 1:
        return "--caption-template-p is a probability: 0 <= p <= 1"
    if cfg.vae_decoder_steps < 0 or not cfg.vae_decoder_lr > 0:
        return "--vae-decoder-steps must be >= 0 (0: none) and --vae-decoder-lr > 0"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda: torch sees no CUDA device here"
    return start_problem(init_from, cfg) if init_from else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="output folder (diffusers/, clip/, onnx/, train.log)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--evaluate", metavar="ONNX_DIR", help="only check an exported folder's prompt accuracy")
    parser.add_argument("--vae", metavar="VAE_DIR", help="reuse DIR/vae of an earlier run with the same seed")
    parser.add_argument("--init-from", metavar="DIFFUSERS_DIR",
                        help="continue training the text encoder and UNet of an earlier run's diffusers/ folder "
                             "(same seed and VAE) for --unet-steps more steps")
    for field in dataclasses.fields(TrainConfig):  # every setting is a flag: --unet-steps 100 ...
        if field.name == "zero_snr":
            parser.add_argument("--zero-snr", type=int, choices=(0, 1), default=field.default)
        elif field.name != "seed" and field.type in (int, float, "int", "float"):
            parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default)
        elif field.type in (tuple, "tuple"):  # --unet-channels 64,128,128
            parser.add_argument("--" + field.name.replace("_", "-"), default=field.default, type=_channels)
        elif field.name in _CHOICES:  # --prediction-type v_prediction, --device cuda
            parser.add_argument("--" + field.name.replace("_", "-"), default=field.default,
                                choices=_CHOICES[field.name])
    args = parser.parse_args(argv)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)})
    problem = recipe_problem(cfg, args.init_from)
    if problem:
        parser.error(problem)
    handlers = [logging.StreamHandler(sys.stderr)]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(args.out, "train.log")))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", handlers=handlers)
    if args.evaluate:
        print(json.dumps(evaluate(args.evaluate, cfg), indent=2))
        return
    if not args.out:
        parser.error("--out is required to train")
    t0 = time.time()
    onnx_dir = train(args.out, cfg, vae_dir=args.vae, init_from=args.init_from)
    log.info("total: %.0f s", time.time() - t0)
    evaluate(onnx_dir, cfg)


if __name__ == "__main__":
    main()
