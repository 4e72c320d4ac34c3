"""Random-weight pipelines with the exact shapes of SD 1.5, SD 2.1 and SDXL base, built offline.

    python -m edge_ti_export.random_sd sd15 OUT_DIR [--seed 0]      # sd15 | sd21 | sdxl

Speed and memory depend on the architecture, not on the weights, so a pipeline built from the
published configs (export/sd_configs/, no weights) measures what a real checkpoint costs without
a download. The tokenizer is CLIP's real 49408-token BPE vocabulary, rebuilt from open_clip's
`bpe_simple_vocab_16e6.txt.gz` the way openai/CLIP's simple_tokenizer.py reads it.
What random weights cannot tell: how a trained model ranks candidates, or image quality.
"""
import argparse
import gzip
import importlib.util
import json
import os
import tempfile

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline,
                       StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from edge_ti.errors import EdgeTIError
from edge_ti.files import atomic_folder

from .tiny import bytes_to_unicode

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sd_configs")
ARCHITECTURES = {"sd15": "SD 1.5 (epsilon, 512 px)", "sd21": "SD 2.1 (v-prediction, 768 px)",
                 "sdxl": "SDXL base 1.0 (epsilon, 1024 px, two text encoders)"}
SCHEDULERS = {"PNDMScheduler": PNDMScheduler, "DDIMScheduler": DDIMScheduler,
              "EulerDiscreteScheduler": EulerDiscreteScheduler}
# CLIP's BPE file: a header line, then merges; the vocabulary is 256 bytes x 2 + merges + 2 specials
N_MERGES = 49152 - 256 - 2


def _config(arch, part, name="config.json"):
    with open(os.path.join(CONFIGS, arch, part, name), encoding="utf-8") as f:
        return json.load(f)


def write_clip_tokenizer(out_dir, pad_token="<|endoftext|>"):
    """CLIP's vocab.json + merges.txt from open_clip's BPE file (no download); -> CLIPTokenizer."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise EdgeTIError("the real CLIP vocabulary comes from open_clip's BPE file: "
                          "pip install --no-deps open_clip_torch")
    bpe = os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1:N_MERGES + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "merges.txt"),
                         model_max_length=77, pad_token=pad_token)


def random_pipeline(arch="sd15", seed=0, tokenizer_dir=None):
    """A StableDiffusionPipeline with ARCH's shapes and random weights (torch's default inits)."""
    if arch not in ARCHITECTURES:
        raise EdgeTIError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(_config(arch, "unet"))
    vae = AutoencoderKL.from_config(_config(arch, "vae"))
    text_config = {k: v for k, v in _config(arch, "text_encoder").items() if k != "architectures"}
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    scheduler_config = _config(arch, "scheduler", "scheduler_config.json")
    scheduler = SCHEDULERS[scheduler_config["_class_name"]].from_config(scheduler_config)
    tok_dir = tokenizer_dir or tempfile.mkdtemp(prefix="edge-ti-clip-tok-")
    if arch == "sdxl":   # SDXL's second tokenizer: the same vocabulary, padded with "!"
        config_2 = {k: v for k, v in _config(arch, "text_encoder_2").items() if k != "architectures"}
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**config_2)),
            tokenizer=write_clip_tokenizer(os.path.join(tok_dir, "1")),
            tokenizer_2=write_clip_tokenizer(os.path.join(tok_dir, "2"), pad_token="!"),
            unet=unet, scheduler=scheduler)
    # SD 2.x's tokenizer pads with "!" (id 0), SD 1.x's with <|endoftext|>
    tokenizer = write_clip_tokenizer(tok_dir, pad_token="!" if arch == "sd21" else "<|endoftext|>")
    return StableDiffusionPipeline(unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                   tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_random_pipeline(arch, out, seed=0):
    """Write the random ARCH pipeline as a diffusers folder at OUT, atomically (temp folder, rename)."""
    with atomic_folder(out) as tmp, tempfile.TemporaryDirectory() as tokenizer_dir:
        pipe = random_pipeline(arch, seed, tokenizer_dir=tokenizer_dir)
        pipe.save_pretrained(tmp)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arch", choices=sorted(ARCHITECTURES))
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(save_random_pipeline(args.arch, args.out, args.seed))


if __name__ == "__main__":
    main()
