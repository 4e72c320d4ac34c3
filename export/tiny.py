"""Tiny random-weight Stable Diffusion pipelines, built offline for tests and the first-run demo.

The component shapes follow diffusers' own pipeline tests (`get_dummy_components` in
tests/pipelines/stable_diffusion/test_stable_diffusion.py): a two-block UNet with
cross-attention, a one-block VAE and a 5-layer CLIP text model of width 32.
"""
import json
import os

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# A small BPE vocabulary in CLIP's format: the 256 byte symbols (alone and with the
# end-of-word mark) plus a few merges, so that ordinary English words tokenize into
# several ids and the vocabulary is big enough to make a PCA basis of 32 directions.
_WORDS = ("a photo of the cat dog mug red blue green on table in style painting rendition "
          "small big bright dark clean cropped close weird cool nice good").split()


def bytes_to_unicode():
    """CLIP's map {byte: printable unicode symbol} (openai/CLIP simple_tokenizer.py), in CLIP's order:
    its values are the first 256 entries of a CLIP vocabulary."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tiny_tokenizer(out_dir):
    """Write vocab.json + merges.txt of a small CLIP-style BPE vocabulary (no download)."""
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in _WORDS:  # merge each word left to right into one symbol
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        cur = parts[0]
        for p in parts[1:]:
            merges.append(f"{cur} {p}")
            cur = cur + p
            if cur not in vocab:
                vocab.append(cur)
    merges = list(dict.fromkeys(merges))
    vocab = list(dict.fromkeys(vocab)) + ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "merges.txt"), model_max_length=77)


def tiny_pipeline(seed=0, prediction_type="epsilon", tokenizer_dir=None, sample_size=32, text_gain=1.0):
    """A random-weight StableDiffusionPipeline small enough to export and run in seconds.

    text_gain > 1 scales the UNet's cross-attention keys and outputs, so that the prompt (and a
    learned token) changes the noise prediction by a measurable amount, as in a trained model;
    at 1 a random UNet all but ignores its text.
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=sample_size // 2,
        in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=32)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False,
                              prediction_type=prediction_type, steps_offset=1)
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
                        latent_channels=4, sample_size=sample_size)
    import tempfile
    tok_dir = tokenizer_dir or tempfile.mkdtemp(prefix="edge-ti-tok-")
    tokenizer = write_tiny_tokenizer(tok_dir)
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1,
                                 pad_token_id=1, hidden_size=32, intermediate_size=37,
                                 layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=5,
                                 vocab_size=len(tokenizer), max_position_embeddings=77)
    text_encoder = CLIPTextModel(text_config)
    if text_gain != 1.0:
        with torch.no_grad():
            for name, module in unet.named_modules():
                if name.endswith("attn2.to_k") or name.endswith("attn2.to_out.0"):
                    module.weight.mul_(text_gain)
    return StableDiffusionPipeline(unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                   tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def write_tiny_concept(out_dir):
    """The concept the tests learn a token for on the tiny model: three 40 px 'photos' of a red disc
    on a blue background, at different places -> out_dir/{0,1,2}.png; returns out_dir."""
    import numpy as np
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    for i, (cx, cy) in enumerate([(12, 14), (20, 18), (16, 10)]):
        y, x = np.mgrid[0:40, 0:40]
        img = np.zeros((40, 40, 3), np.uint8)
        img[...] = (30, 40, 200)
        img[(x - cx) ** 2 + (y - cy) ** 2 < 64] = (220, 30, 30)
        Image.fromarray(img).save(os.path.join(out_dir, f"{i}.png"))
    return out_dir


def tiny_sdxl_pipeline(seed=0, prediction_type="epsilon", tokenizer_dir=None, sample_size=32, text_gain=1.0):
    """A random-weight StableDiffusionXLPipeline as diffusers' SDXL tests build it (`get_dummy_components`
    in tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py), exportable in seconds.

    As in the real SDXL: tokenizer_2 pads with "!", and text_encoder_2's config says eos_token_id 2,
    so transformers (and its ONNX export) pool the projected text_embeds at the *largest* id
    (`input_ids.argmax(-1)`), the end-of-text token in CLIP's vocabulary -- and a new token's id
    after it would be taken instead, which edge_ti.text_encoder's patch prevents. The two text
    encoders have different widths (32 and 48) so that a mixed-up part shows in the shapes.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    import tempfile
    tok_dir = tokenizer_dir or tempfile.mkdtemp(prefix="edge-ti-tok-")
    tokenizer = write_tiny_tokenizer(os.path.join(tok_dir, "tokenizer"))
    write_tiny_tokenizer(os.path.join(tok_dir, "tokenizer_2"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(os.path.join(tok_dir, "tokenizer_2"), pad_token="!",
                                                model_max_length=77)
    widths = (32, 48)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=sample_size // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=widths[1] + 6 * 8,   # text_embeds + 6 time ids x 8
        cross_attention_dim=sum(widths), norm_num_groups=32)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading", prediction_type=prediction_type)
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
                        latent_channels=4, sample_size=sample_size, scaling_factor=0.13025)
    encoders = []
    for width, eos in zip(widths, (len(tokenizer) - 1, 2)):
        torch.manual_seed(seed + len(encoders))
        config = CLIPTextConfig(bos_token_id=len(tokenizer) - 2, eos_token_id=eos, pad_token_id=1,
                                hidden_size=width, intermediate_size=37, layer_norm_eps=1e-05,
                                num_attention_heads=4, num_hidden_layers=5, vocab_size=len(tokenizer),
                                max_position_embeddings=77, projection_dim=width, hidden_act="gelu")
        encoders.append(CLIPTextModel(config) if not encoders else CLIPTextModelWithProjection(config))
    if text_gain != 1.0:
        with torch.no_grad():
            for name, module in unet.named_modules():
                if name.endswith("attn2.to_k") or name.endswith("attn2.to_out.0"):
                    module.weight.mul_(text_gain)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
