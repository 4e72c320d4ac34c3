"""A tiny random-weight CLIPModel folder, built offline for tests (the CLIP beside tiny.py's pipelines).

Widths follow transformers' own CLIP tests (CLIPModelTester: hidden 32, projection 16 ... image 30,
patch 2); here images are 32 px in 8 px patches so the vision tower runs in milliseconds. The
vocabulary is the tiny BPE of tiny.py, so words of the tiny Stable Diffusion pipeline tokenize
the same way in both.
"""
import os

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

from .tiny import write_tiny_tokenizer


def tiny_clip(out_dir, seed=0, tokenizer_dir=None):
    """Save a random CLIPModel + CLIPTokenizer + CLIPImageProcessor to OUT_DIR; returns OUT_DIR."""
    tokenizer = write_tiny_tokenizer(tokenizer_dir or out_dir)
    vocab = len(tokenizer)
    text_config = dict(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                       num_hidden_layers=2, max_position_embeddings=77, layer_norm_eps=1e-5,
                       bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=1)
    vision_config = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                         image_size=32, patch_size=8, num_channels=3, layer_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=16))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
