"""What makes `--init auto`'s first run fast: encoding the vocabulary through CLIP's text tower (issue 17).

    python benchmarks/init_speed.py --models /work/perf-models            # speed, CLIP ViT-L/14 shapes
    python benchmarks/init_speed.py --quality                             # fewer templates: the init's quality

Speed. `edge_ti.init.from_images` first encodes every whole word of the Stable Diffusion vocabulary
(SD 1.x: ~32k words) in each of the init's sentence templates through CLIP's text tower, once per
CLIP (then cached). The CLIP here has the exact shapes of openai/clip-vit-large-patch14 (the CLIP
SD 1.x's text encoder comes from), random weights, the real 49408-token vocabulary, exported into
MODELS/sd15-onnx/clip/ by edge_ti_export.clip_export. Each row (its own process, one after another)
encodes the same sample of --words words and is extrapolated to the whole vocabulary:

    ort T templates, batch B       edge_ti.clip.ClipModel.text_features as init runs it (each batch
                                   cut after its last EOS: the model is causal and pools there)
    ort ... 77 tokens              the same without the cut (what the text tower costs padded)
    ort int8 ...                   the text tower with MatMul/Gemm in int8 (edge_ti.quantize.quantize_int8)
    torch ... (at export time)     transformers' CLIPModel.get_text_features, padding to the longest
                                   prompt of the batch: what `edge-ti export` could precompute with torch

Quality. Fewer templates make fewer keys to encode; this checks what they change in the init on the
shapes-world model (its own trained CLIP): for concepts drawn as benchmarks/optimizers.py draws them
(none of quality.py's), e0 from 4, 2 and 1 templates, judged like optimizers.py (relative change of
the denoising loss from the init word's, on fresh images and 256 fixed triples), with the cosine
between the e0s and the overlap of the top-5 words.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

# openai/clip-vit-large-patch14's config.json, the fields CLIPConfig needs
CLIP_L = {
    "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                    "num_hidden_layers": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                    "vocab_size": 49408, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1},
    "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                      "num_hidden_layers": 24, "image_size": 224, "patch_size": 14, "hidden_act": "quick_gelu"},
    "projection_dim": 768, "logit_scale_init_value": 2.6592,
}


def build_clip(models):
    """MODELS/clip-l-random (transformers) and MODELS/sd15-onnx/clip (ONNX), once."""
    source = os.path.join(models, "clip-l-random")
    target = os.path.join(models, "sd15-onnx")
    if not os.path.isdir(os.path.join(target, "clip")):
        import torch
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

        from edge_ti_export.clip_export import export_clip
        from edge_ti_export.random_sd import write_clip_tokenizer
        if not os.path.isdir(source):
            torch.manual_seed(0)
            model = CLIPModel(CLIPConfig(**CLIP_L))
            os.makedirs(source)
            model.save_pretrained(source)
            write_clip_tokenizer(source).save_pretrained(source)
            CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(source)
        print("# exporting the random CLIP ViT-L/14 into", target, flush=True)
        export_clip(source, target)
    int8 = os.path.join(models, "clip-l-text-int8", "text_model.onnx")
    if not os.path.isfile(int8):
        from edge_ti.quantize import quantize_int8
        os.makedirs(os.path.dirname(int8), exist_ok=True)
        quantize_int8(os.path.join(target, "clip", "text_model.onnx"), int8)
    return source, target, int8


def sample_prompts(model, words, templates):
    from edge_ti.init import TEMPLATES, vocabulary
    vocab = vocabulary(model)
    step = max(1, len(vocab) // words)
    chosen = vocab[::step][:words]
    return len(vocab), [t.format(w) for w in chosen for t in TEMPLATES[:templates]]


def row(spec):
    """One row in this process: seconds per prompt on the sample."""
    import edge_ti
    from edge_ti.clip import clip_model
    model = edge_ti.open_model(spec["onnx"], threads=spec["threads"])
    vocab_words, prompts = sample_prompts(model, spec["words"], spec["templates"])
    batch = spec["batch"]
    if spec["kind"] == "torch":
        import torch
        from transformers import CLIPModel, CLIPTokenizer
        torch.set_num_threads(spec["threads"])
        clip = CLIPModel.from_pretrained(spec["source"]).eval()
        tokenizer = CLIPTokenizer.from_pretrained(spec["source"])

        def encode(chunk):
            ids = tokenizer(chunk, padding="longest", return_tensors="pt").input_ids
            with torch.inference_mode():
                return clip.get_text_features(input_ids=ids)
        encode(prompts[:batch])  # warm-up
        start = time.perf_counter()
        for i in range(0, len(prompts), batch):
            encode(prompts[i:i + batch])
        seconds = time.perf_counter() - start
    else:
        clip = clip_model(model)
        if spec.get("int8"):
            clip.__dict__["text_session"] = model.open_session(spec["int8"])
        if spec.get("unsorted"):  # batches in the prompts' order, each cut after its last EOS
            session = clip.text_session
            eos_id = clip.tokenizer.eos_id

            def run_unsorted(chunk):
                ids = clip.tokenizer(chunk)
                end = int((ids == eos_id).argmax(axis=1).max()) + 1
                return session.run(None, {"input_ids": ids[:, :end]})[0]
            run_unsorted(prompts[:batch])
            start = time.perf_counter()
            for i in range(0, len(prompts), batch):
                run_unsorted(prompts[i:i + batch])
            seconds = time.perf_counter() - start
        elif spec.get("padded"):
            session = clip.text_session

            def run_padded(chunk):
                return session.run(None, {"input_ids": clip.tokenizer(chunk)})[0]
            run_padded(prompts[:batch])
            start = time.perf_counter()
            for i in range(0, len(prompts), batch):
                run_padded(prompts[i:i + batch])
            seconds = time.perf_counter() - start
        else:
            clip.text_features(prompts[:batch], batch=batch)  # warm-up (and the session)
            start = time.perf_counter()
            clip.text_features(prompts, batch=batch)
            seconds = time.perf_counter() - start
    per = seconds / len(prompts)
    return {"prompts": len(prompts), "seconds": seconds, "per_prompt": per, "vocab_words": vocab_words,
            "full_minutes": per * vocab_words * spec["templates"] / 60,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2}


def speed(args):
    # built in a child: ru_maxrss survives fork + exec, so the export's peak would be every row's
    subprocess.run([sys.executable, __file__, "--build", "--models", args.models], check=True)
    source, onnx_dir, int8 = build_clip(args.models)
    os.environ.setdefault("EDGE_TI_CACHE", os.path.join(args.models, "cache"))
    common = {"onnx": onnx_dir, "source": source, "threads": args.threads, "words": args.words}
    rows = [("ort, 4 templates, batch 64 (today)", {"kind": "ort", "templates": 4, "batch": 64}),
            ("ort, 4 templates, batch 64, 77 tokens (no cut)", {"kind": "ort", "templates": 4, "batch": 64, "padded": True}),
            ("ort, 4 templates, batch 256", {"kind": "ort", "templates": 4, "batch": 256}),
            ("ort, 4 templates, batch 16", {"kind": "ort", "templates": 4, "batch": 16}),
            ("ort, 4 templates, batch 64, unsorted (before 2026-11-30)", {"kind": "ort", "templates": 4, "batch": 64,
                                                                          "unsorted": True}),
            ("ort int8, 4 templates, batch 64", {"kind": "ort", "templates": 4, "batch": 64, "int8": int8}),
            ("ort, 1 template, batch 64", {"kind": "ort", "templates": 1, "batch": 64}),
            ("ort int8, 1 template, batch 64", {"kind": "ort", "templates": 1, "batch": 64, "int8": int8}),
            ("torch fp32, 4 templates, batch 64 (at export time)", {"kind": "torch", "templates": 4, "batch": 64})]
    print(f"# {' '.join(sys.argv)}\n# {args.words} words sampled evenly from the vocabulary; {args.threads} threads")
    print("| row | prompts | s / prompt | whole vocabulary (min) | peak RSS GB |\n|---|---|---|---|---|", flush=True)
    for name, spec in rows:
        proc = subprocess.run([sys.executable, __file__, "--row", json.dumps({**common, **spec})],
                              capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"| {name} | failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][-200:]} ||||", flush=True)
            continue
        r = json.loads(line[7:])
        print(f"| {name} | {r['prompts']} | {r['per_prompt']:.4f} | {r['full_minutes']:.1f} "
              f"(x {r['vocab_words']} words) | {r['peak_rss_gb']:.2f} |", flush=True)


def quality(args):
    import importlib.util

    from PIL import Image

    import edge_ti
    from edge_ti import init as initialization
    from edge_ti.shapes import HELD_OUT, concept_images
    spec = importlib.util.spec_from_file_location("optimizers", os.path.join(HERE, "optimizers.py"))
    optimizers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(optimizers)
    model = edge_ti.open_model("shapes", threads=args.threads)
    concepts, name_of = optimizers.draw_concepts(args.concept_seed, args.concepts)
    counts = (4, 2, 1)
    print(f"# {' '.join(sys.argv)}\n| concept | seed | judged loss vs the init word: "
          + " / ".join(f"{c} templates" for c in counts) + " | cos(e0) 4 vs 2, 4 vs 1 | top-5 words shared with 4 |")
    print("|---|---|---|---|---|")
    table = {c: [] for c in counts}
    for fixed in concepts:
        for seed in args.seeds:
            rng = np.random.default_rng([seed, 1])
            exclude = tuple(c for c in HELD_OUT if not all(fixed.get(k) == v for k, v in c.items()))
            images = [Image.fromarray(i) for i in concept_images(6, rng, exclude=exclude, **fixed)]
            e0s, tops = {}, {}
            for c in counts:
                e0s[c], top = initialization.from_images(model, images, templates=initialization.TEMPLATES[:c], show=5)
                tops[c] = [w for w, _ in top]
            word = initialization.from_word(model, fixed["shape"])
            judged = optimizers.judge(model, fixed, seed, word, [e0s[c] for c in counts])
            for c, j in zip(counts, judged):
                table[c].append(float(j))
            cos = [float(np.dot(e0s[4][0], e0s[c][0]) / np.linalg.norm(e0s[4][0]) / np.linalg.norm(e0s[c][0]))
                   for c in (2, 1)]
            shared = [len(set(tops[4]) & set(tops[c])) for c in (2, 1)]
            print(f"| {name_of(fixed)} | {seed} | " + " / ".join(f"{100 * j:+.2f}%" for j in judged)
                  + f" | {cos[0]:.3f}, {cos[1]:.3f} | {shared[0]}, {shared[1]} |", flush=True)
    print("| **mean** | | " + " / ".join(f"{100 * np.mean(table[c]):+.2f}%" for c in counts) + " | | |")
    d = np.array(table[1]) - np.array(table[4])
    print(f"# 1 template - 4 templates, paired: {100 * d.mean():+.2f} ± {100 * d.std(ddof=1) / np.sqrt(len(d)):.2f} points "
          f"(worse in {int((d > 0).sum())} of {len(d)})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--models", default="/work/perf-models")
    parser.add_argument("--words", type=int, default=512, help="words sampled from the vocabulary per row")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--concepts", type=int, default=6)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--concept-seed", type=int, default=5)
    args = parser.parse_args()
    if args.row:
        print("RESULT " + json.dumps(row(json.loads(args.row))), flush=True)
    elif args.build:
        build_clip(args.models)
    elif args.quality:
        quality(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
