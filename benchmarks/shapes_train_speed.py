"""Seconds per training step of the shapes model's two long stages (issue 15: training <= 2 h on 2 cores), in the
precisions and compilation modes torch offers on this CPU, side by side in one process.

    python benchmarks/shapes_train_speed.py [--steps 30] [--rounds 2] [--threads 2] [--compile]

Rows: the joint VAE stage (`shapes_train.train_vae`, batch 64) in fp32 and under bfloat16 autocast
(`--vae-precision bf16`); the text encoder + UNet stage (`shapes_train.train_unet`, batch 64, half the captions
templated) in fp32 and with its forward passes under bfloat16 autocast (wrapped here: shapes_train has no such
option), and with `--compile` the UNet through torch.compile (its first call, the compilation, timed apart).
Each mode runs `--rounds` times, interleaved; a step's time is (a run of steps + 1 - a run of 1) / steps, so the
setup and the first step cancel; the table prints the median. The VAE and UNet
are the shipped model's architecture from scratch (the speed does not depend on the weights); the UNet trains on the
shipped VAE's latents of a 4000-image training set.
"""
import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def autocast_forward(module):
    """MODULE's forward under bfloat16 autocast (weights, optimizer and loss stay float32, as --vae-precision)."""
    import torch
    forward = module.forward

    def wrapped(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return forward(*args, **kwargs)
    module.forward = wrapped
    return module


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    p.add_argument("--rounds", type=int, default=2, help="measurements per mode, interleaved")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also the UNet through torch.compile")
    args = p.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.threads < 1:
        p.error("--steps, --rounds and --threads must be at least 1")

    import logging

    import torch
    from diffusers import AutoencoderKL

    from edge_ti.runtime import cpu_has_bf16
    from edge_ti_export import shapes_train as st
    logging.disable(logging.INFO)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    images, attributes = st.make_dataset(4000, 0, 0.2)
    tokenizer = st.write_tokenizer(os.path.join(os.environ.get("TMPDIR", "/tmp"), "shapes_train_speed_tok"),
                                   st.vocabulary_words())
    vae = AutoencoderKL.from_pretrained(os.path.join(ROOT, "export", "shapes_diffusers", "vae")).eval()
    means, stds = st.encode_all(vae, images)
    make_unet, make_text_encoder = st.make_unet, st.make_text_encoder

    def vae_step(precision):
        def run(steps):
            cfg = st.TrainConfig(vae_max_steps=steps, vae_check_every=10 ** 6, vae_precision=precision,
                                 threads=args.threads)
            st.train_vae(cfg, images, st._stage_random(0)[0])
        return run

    def unet_step(mode):
        def run(steps):
            wrap = {"fp32": lambda m: m, "bf16": autocast_forward,
                    "compile": lambda m: (m.compile(dynamic=False), m)[1]}[mode]
            st.make_unet = lambda cfg, n: wrap(make_unet(cfg, n))
            st.make_text_encoder = lambda cfg, tok: (autocast_forward if mode == "bf16" else (lambda m: m))(
                make_text_encoder(cfg, tok))
            try:
                cfg = st.TrainConfig(unet_steps=steps, threads=args.threads, caption_template_p=0.5)
                st.train_unet(cfg, means, stds, 0.7958, attributes, st.CaptionIds(tokenizer), tokenizer,
                              *st._stage_random(1))
            finally:
                st.make_unet, st.make_text_encoder = make_unet, make_text_encoder
        return run

    modes = [("vae", "fp32", vae_step("fp32")), ("vae", "bf16 autocast", vae_step("bf16")),
             ("unet + text encoder", "fp32", unet_step("fp32")), ("unet + text encoder", "bf16 autocast",
                                                                  unet_step("bf16"))]
    if args.compile:
        modes.append(("unet + text encoder", "unet torch.compile", unet_step("compile")))
    compile_s = {}  # the first run of a compiled mode (compilation); later runs reuse inductor's cache
    setup = {(stage, mode): [] for stage, mode, _ in modes}
    seconds = {(stage, mode): [] for stage, mode, _ in modes}
    print(f"CPU bf16 (AVX512-BF16 / AMX): {cpu_has_bf16()}; torch {torch.__version__}, {args.threads} threads, "
          f"{args.steps} steps x {args.rounds} rounds", flush=True)
    for round_ in range(args.rounds):
        for stage, mode, run in modes:
            if "compile" in mode and not round_:
                t = time.perf_counter()
                run(1)
                compile_s[(stage, mode)] = time.perf_counter() - t
            # a run of 1 step and one of steps + 1: their difference is the steps alone (setup and the first step,
            # with its one-off costs, cancel)
            t = time.perf_counter()
            run(1)
            one = time.perf_counter() - t
            t = time.perf_counter()
            run(args.steps + 1)
            seconds[(stage, mode)].append((time.perf_counter() - t - one) / args.steps)
            setup[(stage, mode)].append(one)
            print(f"  round {round_ + 1}: {stage}, {mode}: {seconds[(stage, mode)][-1]:.3f} s per step", flush=True)
    print("| stage (batch 64) | mode | s per step (median) | fp32 / this | a 1-step run (setup + first step) s |")
    print("|---|---|---|---|---|")
    for stage, mode, _ in modes:
        median = statistics.median(seconds[(stage, mode)])
        base = statistics.median(seconds[(stage, "fp32")])
        extra = f" (the first, compiling: {compile_s[(stage, mode)]:.0f})" if (stage, mode) in compile_s else ""
        print(f"| {stage} | {mode} | {median:.3f} | {base / median:.2f}x | "
              f"{statistics.median(setup[(stage, mode)]):.1f}{extra} |")
    print("per round:", {f"{stage}, {mode}": [round(s, 3) for s in v] for (stage, mode), v in seconds.items()})


if __name__ == "__main__":
    sys.exit(main())
