"""How much of a UNet forward runs before the prompt enters it? (issue 17)

    python benchmarks/prompt_free_prefix.py --unet export/shapes_diffusers/unet --latent 8
    python benchmarks/prompt_free_prefix.py --unet export/sd_configs/sd15/unet --latent 32    # sd21, sdxl (64) too

A candidate token reaches the UNet only through the cross-attention (attn2) of its transformer blocks.
Everything the forward computes before the first attn2 (conv_in, the time embedding, the first
ResNet(s), the first block's proj_in and self-attention) is the same for every candidate of a generation
on the same (x_t, t) triple: int8_conv_layers.py found that rounding there cannot reorder the candidates,
and a scorer could compute it once per triple instead of once per candidate. This prints that prefix's
share of the forward's FLOPs (torch.utils.flop_counter, random weights from the UNet's config: the
share depends on the architecture and the latent size only).
"""
import argparse

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode


def prefix_share(unet, latent, text_len=77):
    """(FLOPs before the first cross-attention, FLOPs of the whole forward) for one sample."""
    first = next(m for name, m in unet.named_modules() if name.endswith("attn2"))
    counter, before = FlopCounterMode(display=False), []
    handle = first.register_forward_pre_hook(lambda module, args: before.append(counter.get_total_flops()))
    sample = torch.randn(1, unet.config.in_channels, latent, latent)
    hidden = torch.randn(1, text_len, unet.config.cross_attention_dim)
    kwargs = {}
    c = unet.config
    if c.addition_embed_type == "text_time":  # SDXL: pooled text and time ids
        width = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, width), "time_ids": torch.randn(1, 6)}
    with torch.no_grad(), counter:
        unet(sample, 500, hidden, **kwargs)
    handle.remove()
    return before[0], counter.get_total_flops()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet", required=True, help="a diffusers unet/ folder (its config.json is enough)")
    parser.add_argument("--latent", type=int, nargs="+", default=[32])
    args = parser.parse_args()
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(args.unet)).eval()
    print(f"# {args.unet}: block_out_channels {tuple(unet.config.block_out_channels)}")
    print("| latent | GFLOPs per sample | before the first cross-attention | share |\n|---|---|---|---|")
    for latent in args.latent:
        prefix, total = prefix_share(unet, latent)
        print(f"| {latent}x{latent} | {total / 1e9:.2f} | {prefix / 1e9:.2f} | {prefix / total:.1%} |", flush=True)


if __name__ == "__main__":
    main()
