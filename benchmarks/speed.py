"""Speed and memory of one candidate evaluation, side by side with torch on the same weights.

    python benchmarks/speed.py --models /work/perf-models --model sd15 [--latents 32 64] [--batches 1 4 20]

MODELS holds, per model name, a diffusers folder `<name>-diffusers` (built by
`python -m edge_ti_export.random_sd sd15 ...`) and its ONNX export `<name>-onnx`; the int8 and fp16
copies `<name>-onnx-int8`, `<name>-onnx-fp16` are made with edge_ti.quantize on first use.
Every row runs in its own subprocess, one at a time, so its peak RSS is its own (ru_maxrss of
that process: loading, optimizing and running). The rows:

    torch fwd P      diffusers UNet forward, eager, inference_mode                       (per sample)
    torch grad step P  text encoder + UNet forward, MSE loss, backward to the token-embedding
                     table only, AdamW step: one step of diffusers' textual_inversion.py
                     (per sample, at --torch-batches)
                     P, the precision: fp32; bf16-autocast (torch.autocast(bfloat16)); bf16 (the
                     UNet's weights in bfloat16, as the script's --mixed_precision bf16)
    ort <variant>    edge_ti.objective.population_loss with B candidates and 1 triple:
                     B candidate evaluations (text encoder for B prompts, UNet batch B);
                     openvino[-P][-X]: the folder of variant X with --device openvino (-P: --precision P, f32,
                     bf16 or f16; none: auto), run by
                     --openvino-python (onnxruntime-openvino cannot share a Python with onnxruntime)
    generation       population_loss with 20 candidates x 4 triples: one training generation
                     as `edge-ti train` ran it until stop 38 (today's are 10 x 2: the same cost per
                     UNet sample, which speed.md reports); its losses feed the
                     Spearman check, fp32 vs int8

A candidate evaluation is one candidate on one triple: one text-encoder prompt + one UNet sample,
the same work as the forward half of a gradient step on one sample. The ratio columns' unit is the
strongest torch gradient step per sample (the fastest precision and batch measured).
FLOPs are counted once with torch.utils.flop_counter (conv, matmul, attention; 2 per multiply-add).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT = "a photo of a <t>"


# ---------------------------------------------------------------- machine
def cpu_description():
    """lscpu-like facts and the fp32 peak: cores x clock x FLOPs per cycle (from the ISA flags)."""
    from edge_ti.runtime import cpu_has_bf16
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        first = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
    first = {k.strip(): v.strip() for k, v in first.items()}
    flags = set(first.get("flags", "").split())
    cores = os.cpu_count()
    # clock: "cpu MHz" when the kernel shows it, else the TSC rate (bogomips / 2), the nominal clock
    mhz = float(first.get("cpu MHz") or float(first.get("bogomips", 0)) / 2)
    family = int(first.get("cpu family", 0))
    zen4 = first.get("vendor_id") == "AuthenticAMD" and family == 25 and "avx512f" in flags
    if zen4:
        # Zen 4 executes AVX-512 on two 256-bit FMA pipes: 2 x 8 lanes x 2 FLOPs
        per_cycle, how = 32, "Zen 4: 2 FMA pipes x 8 fp32 lanes (AVX-512 double-pumped on 256-bit units) x 2"
    elif "avx512f" in flags:
        per_cycle, how = 64, "AVX-512: 2 FMA units x 16 fp32 lanes x 2"
    elif "avx2" in flags and "fma" in flags:
        per_cycle, how = 32, "AVX2: 2 FMA units x 8 fp32 lanes x 2"
    else:
        per_cycle, how = 8, "SSE: 4 lanes x (add + mul)"
    return {"model": first.get("model name", "?"), "vendor": first.get("vendor_id"), "family": family,
            "model_id": first.get("model"), "cores": cores, "mhz": mhz, "flops_per_cycle": per_cycle,
            "peak_gflops": cores * mhz * 1e-3 * per_cycle, "peak_how": how,
            "bf16": cpu_has_bf16(),
            "simd": " ".join(sorted(f for f in flags if f.startswith(("avx", "fma", "f16c", "amx")))),
            "onnxruntime": __import__("onnxruntime").__version__}


def load_average():
    return os.getloadavg()[0]


def busy_cpu_seconds():
    """CPU seconds all processes have used since boot (user + nice + system + irq + softirq + steal)."""
    with open("/proc/stat", encoding="utf-8") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def others_cores(seconds=3.0):
    """How many cores other processes keep busy right now (this process sleeps meanwhile)."""
    before = busy_cpu_seconds()
    time.sleep(seconds)
    return (busy_cpu_seconds() - before) / seconds


def wait_for_quiet(threshold, max_wait):
    """Wait (up to max_wait seconds) until others use at most `threshold` cores; -> what they use."""
    deadline = time.time() + max_wait
    busy = others_cores()
    while busy > threshold and time.time() < deadline:
        time.sleep(10)
        busy = others_cores()
    return busy


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # KiB on Linux


# ---------------------------------------------------------------- rows (each in its own process)
SLOW = 20.0  # seconds: a row whose warm-up took longer is timed once (bf16 without hardware bf16 crawls)


def _timed(fn, reps, warmup=1):
    for _ in range(warmup):
        start = time.perf_counter()
        fn()
        if time.perf_counter() - start > SLOW:
            reps = 1
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


TORCH_PRECISIONS = ("fp32", "bf16-autocast", "bf16")  # bf16: the weights themselves in bfloat16


def _added_cond(unet, B, dtype, g=None):
    """SDXL's added conditioning for a UNet that takes it (text_embeds, time_ids), else None."""
    import torch
    c = unet.config
    if c.addition_embed_type != "text_time":
        return None
    width = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim   # text_embeds' width
    return {"text_embeds": torch.randn(B, width, generator=g).to(dtype),
            "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]]).repeat(B, 1).to(dtype)}


def _text_encoders(src):
    """The diffusers folder's text encoders, [CLIPTextModel] or (SDXL) [CLIPTextModel, CLIPTextModelWithProjection]."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    encoders = [CLIPTextModel.from_pretrained(os.path.join(src, "text_encoder"))]
    if os.path.isdir(os.path.join(src, "text_encoder_2")):
        encoders.append(CLIPTextModelWithProjection.from_pretrained(os.path.join(src, "text_encoder_2")))
    return encoders


def _encode(encoders, ids):
    """(encoder_hidden_states, pooled text_embeds or None) as the pipelines compute them (SDXL: penultimate
    states of both encoders side by side, text_encoder_2's text_embeds)."""
    import torch
    if len(encoders) == 1:
        return encoders[0](ids)[0], None
    states, pooled = [], None
    for encoder in encoders:
        out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]
    return torch.cat(states, dim=-1), pooled


def row_torch_fwd(args):
    import contextlib

    import torch
    from diffusers import UNet2DConditionModel
    torch.set_num_threads(args["threads"])
    precision = args.get("precision", "fp32")
    unet = UNet2DConditionModel.from_pretrained(os.path.join(args["diffusers"], "unet")).eval()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    unet = unet.to(dtype)
    B, L = args["batch"], args["latent"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 4, L, L, generator=g).to(dtype)                        # (B, 4, h, w)
    t = torch.full((B,), 500)
    h = torch.randn(B, 77, unet.config.cross_attention_dim, generator=g).to(dtype)  # (B, 77, D)
    added = _added_cond(unet, B, dtype, g)                                      # SDXL: text_embeds, time_ids
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-autocast"
                else contextlib.nullcontext())
    with torch.inference_mode(), autocast:
        seconds, times = _timed(lambda: unet(x, t, h, added_cond_kwargs=added), args["reps"])
    return {"seconds": seconds, "times": times, "evaluations": B}


def row_torch_grad(args):
    """One textual-inversion step as diffusers' examples/textual_inversion/textual_inversion.py takes it.

    precision bf16-autocast: the forward passes under torch.autocast(bfloat16); bf16: also the UNet's
    weights in bfloat16, the text encoder (which holds the trained rows) in float32, as the script
    does with --mixed_precision bf16 (weight_dtype for the frozen UNet and VAE, autocast around them).
    """
    import contextlib

    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer
    torch.set_num_threads(args["threads"])
    src = args["diffusers"]
    unet = UNet2DConditionModel.from_pretrained(os.path.join(src, "unet"))
    encoders = _text_encoders(src)                                     # SDXL: both, the token in each table
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(src, "tokenizer"))
    scheduler = DDPMScheduler.from_pretrained(os.path.join(src, "scheduler"))
    tokenizer.add_tokens(["<t>"])
    placeholder = tokenizer.convert_tokens_to_ids("<t>")
    # as the script: everything frozen but the token-embedding table(s)
    unet.requires_grad_(False)
    tables = []
    for encoder in encoders:
        encoder.resize_token_embeddings(len(tokenizer))
        encoder.requires_grad_(False)
        tables.append(encoder.get_input_embeddings().weight)
        tables[-1].requires_grad_(True)
        encoder.train()
    unet.train()
    precision = args.get("precision", "fp32")
    if precision == "bf16":
        unet.to(torch.bfloat16)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision != "fp32"
                else contextlib.nullcontext())
    optimizer = torch.optim.AdamW(tables, lr=5e-4)
    originals = [table.detach().clone() for table in tables]
    keep = torch.ones(len(tokenizer), dtype=torch.bool)
    keep[placeholder] = False
    B, L = args["batch"], args["latent"]
    ids = tokenizer([PROMPT] * B, padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids                             # (B, 77)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(B, 4, L, L, generator=g)                             # (B, 4, h, w)

    def step():
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (B,), generator=g)
        noisy = scheduler.add_noise(latents, noise, t)
        with autocast:
            hidden, pooled = _encode(encoders, ids)                            # (B, 77, D), SDXL (B, D_g)
            added = None if pooled is None else {"text_embeds": pooled.to(unet.dtype),
                                                 "time_ids": _added_cond(unet, B, unet.dtype)["time_ids"]}
            pred = unet(noisy.to(unet.dtype), t, hidden.to(unet.dtype), added_cond_kwargs=added).sample
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():  # the script restores every row but the placeholder's
            for table, original in zip(tables, originals):
                table[keep] = original[keep]

    seconds, times = _timed(step, args["reps"])
    return {"seconds": seconds, "times": times, "evaluations": B}


class _Timed:
    """A session proxy adding up the seconds spent in run()."""

    def __init__(self, session):
        self.session, self.seconds = session, 0.0

    def run(self, *a, **k):
        start = time.perf_counter()
        try:
            return self.session.run(*a, **k)
        finally:
            self.seconds += time.perf_counter() - start

    def __getattr__(self, name):
        return getattr(self.session, name)


def _open_model(args):
    """edge_ti.open_model with this row's threads and session settings (edge_ti.session)."""
    import edge_ti
    from edge_ti.session import SessionSettings
    device = args.get("device", "cpu")
    settings = {"cache": device == "cpu", **args.get("session", {})}
    return edge_ti.open_model(args["onnx"], device=device, threads=args["threads"],
                              session_settings=SessionSettings(**settings))


def _population(model, P, L, seed=0, n_latents=1):
    rng = np.random.default_rng(seed)
    e0 = model.token_embeddings[model.tokenizer(["cat"])[0][1]][None]          # (1, D): "cat" as the init
    spread = 0.5 * float(model.token_embeddings.std())  # CMA-ES's initial step in the full space
    candidates = (e0[None] + rng.normal(0, spread, (P, 1, e0.shape[1]))).astype(np.float32)  # (P, 1, D)
    latents = rng.standard_normal((n_latents, 4, L, L)).astype(np.float32)    # (N, 4, h, w)
    return e0, candidates, latents


def row_ort(args):
    from edge_ti import objective
    from edge_ti.denoiser import Denoiser
    start = time.perf_counter()
    model = _open_model(args)
    unet = _Timed(model.session("unet"))
    texts = {p.name: _Timed(model.text_session(p.name)) for p in model.text_parts}   # SDXL: both encoders
    load_seconds = time.perf_counter() - start
    open_session = model.session
    model.session = lambda part: unet if part == "unet" else open_session(part)  # timed
    model.text_encoder = texts["text_encoder"]
    model.text_session = lambda name: texts[name]
    B, L = args["batch"], args["latent"]
    e0, candidates, latents = _population(model, B, L)
    prompt_ids = model.tokenize([PROMPT], {"<t>": e0})                          # (1, 77)
    triples = objective.Triples(latent_index=np.zeros(1, int), prompt_index=np.zeros(1, int),
                                timesteps=np.array([500]),
                                noise=np.random.default_rng(1).standard_normal((1, 4, L, L), dtype=np.float32))
    out = {}

    def evaluate():
        out["losses"] = objective.population_loss(Denoiser(model), candidates, prompt_ids, latents, triples,
                                                  max_batch=args["max_batch"])
    evaluate()  # warm-up: first-run allocations
    unet.seconds = 0.0
    for text in texts.values():
        text.seconds = 0.0
    seconds, times = _timed(evaluate, args["reps"], warmup=0)
    result = {"seconds": seconds, "times": times, "evaluations": B, "load_seconds": load_seconds,
              "unet_seconds": unet.seconds / args["reps"],
              "text_seconds": sum(text.seconds for text in texts.values()) / args["reps"],
              "losses": out["losses"].tolist()}
    if args.get("dump"):  # one fixed UNet output for the relative-error column
        rng = np.random.default_rng(2)
        sample = rng.standard_normal((1, 4, L, L)).astype(np.float32)
        hidden, pooled = Denoiser(model).encode([PROMPT.replace("<t>", "cat")])
        np.save(args["dump"], Denoiser(model).unet(sample, 500.0, hidden, pooled=pooled))
    return result


def row_generation(args):
    """One training generation: P candidates x T triples over the object templates, as train() does."""
    from edge_ti import objective
    from edge_ti.denoiser import Denoiser
    from edge_ti.train import OBJECT_TEMPLATES
    model = _open_model(args)
    P, L = args["batch"], args["latent"]
    e0, candidates, latents = _population(model, P, L, n_latents=4)
    prompts = [t.format("<t>") for t in OBJECT_TEMPLATES]
    prompt_ids = model.tokenize(prompts, {"<t>": e0})                          # (K, 77)
    rng = np.random.default_rng(3)
    warm = objective.draw_triples(rng, 1, len(latents), len(prompts), 1000, latents.shape[1:])
    triples = objective.draw_triples(rng, args["triples"], len(latents), len(prompts), 1000, latents.shape[1:])
    objective.population_loss(Denoiser(model), candidates, prompt_ids, latents, warm, args["max_batch"])
    start = time.perf_counter()
    losses = objective.population_loss(Denoiser(model), candidates, prompt_ids, latents, triples, args["max_batch"])
    seconds = time.perf_counter() - start
    result = {}
    if args.get("alt"):  # the same population on the next generation's triples: the objective's own noise
        alt = objective.draw_triples(rng, args["triples"], len(latents), len(prompts), 1000, latents.shape[1:])
        result["losses_alt"] = objective.population_loss(Denoiser(model), candidates, prompt_ids, latents, alt,
                                                         args["max_batch"]).tolist()
    return {**result, "seconds": seconds, "times": [seconds], "evaluations": P, "losses": losses.tolist(),
            "distinct_timesteps": int(len(np.unique(triples.timesteps))),
            "prompts_used": int(len(np.unique(triples.prompt_index)))}


def row_flops(args):
    """FLOPs of a UNet forward (batch 1), a text-encoder forward (1 prompt) and a gradient step."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    torch.set_num_threads(args["threads"])
    src = args["diffusers"]
    unet = UNet2DConditionModel.from_pretrained(os.path.join(src, "unet"))
    encoders = _text_encoders(src)                                     # SDXL: both
    D = unet.config.cross_attention_dim
    out = {}
    ids = torch.zeros(1, 77, dtype=torch.long)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        _encode(encoders, ids)
    out["text"] = counter.get_total_flops()
    added = _added_cond(unet, 1, torch.float32)
    for L in args["latents"]:
        x, t, h = torch.randn(1, 4, L, L), torch.tensor([500]), torch.randn(1, 77, D)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(x, t, h, added_cond_kwargs=added)
        out[f"unet{L}"] = counter.get_total_flops()
        if L == min(args["latents"]):  # the backward costs the same multiple at every size
            unet.requires_grad_(False)
            for encoder in encoders:
                encoder.requires_grad_(False)
                encoder.get_input_embeddings().weight.requires_grad_(True)
            with FlopCounterMode(display=False) as counter:
                hidden, pooled = _encode(encoders, ids)
                cond = None if pooled is None else {**added, "text_embeds": pooled}
                pred = unet(x, t, hidden, added_cond_kwargs=cond).sample
                pred.square().mean().backward()
            out["grad_factor"] = counter.get_total_flops() / (out[f"unet{L}"] + out["text"])
    return out


def row_gemm(args):
    """The GEMM rate torch reaches on this CPU: a practical peak to set the others against."""
    import torch
    torch.set_num_threads(args["threads"])
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds, times = _timed(lambda: [torch.mm(a, b) for _ in range(10)], args["reps"])
    return {"seconds": seconds, "times": times, "gflops": 10 * 2 * n ** 3 / seconds / 1e9}


def row_prepare(args):
    """Create the sessions once: the optimized graphs land in the cache, untimed."""
    start = time.perf_counter()
    model = _open_model(args)
    model.session("unet")
    for part in model.text_parts:   # SDXL: both text encoders
        model.text_session(part.name)
    return {"seconds": time.perf_counter() - start}


ROWS = {"gemm": row_gemm, "prepare": row_prepare, "torch_fwd": row_torch_fwd, "torch_grad": row_torch_grad, "ort": row_ort,
        "generation": row_generation, "flops": row_flops}


def child(spec):
    args = json.loads(spec)
    if args.get("max_memory_gb"):
        limit = int(args["max_memory_gb"] * 1024 ** 3)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    result = ROWS[args["kind"]](args)
    result["peak_rss_gb"] = peak_rss_gb()
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- the driver
QUIET = {"threshold": 0.3, "max_wait": 600, "tries": 3, "max_memory_gb": 18.0}


OPENVINO_HINTS = ("f32", "bf16", "f16")  # --precision values a variant may name (edge_ti.runtime.OPENVINO_PRECISIONS)
PYTHONS = {}  # device -> the Python whose onnxruntime build has it (--openvino-python); default this one
REUSE = {}  # json of a row's args -> results logged by earlier runs (--log): rows are not rerun


def load_log(path):
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                entry = json.loads(line)
                if "error" not in entry["result"]:
                    REUSE.setdefault(json.dumps(entry["args"], sort_keys=True), []).append(entry["result"])


def run_row(args, log):
    """Run a row until other processes stayed under QUIET["threshold"] cores during it (at most
    QUIET["tries"] times); -> the least disturbed result. A row already in the log is not rerun."""
    logged = REUSE.get(json.dumps(args, sort_keys=True))
    if logged and args["kind"] != "prepare":
        return dict(min(logged, key=lambda r: r["others_during"]), reused=True)
    if args["kind"] in ("flops", "prepare"):  # counts and caches: not timed
        return _run_row_once(args, log, quiet=False)
    best = None
    for _ in range(QUIET["tries"]):
        result = _run_row_once(args, log)
        if "error" in result:
            return result
        if best is None or result["others_during"] < best["others_during"]:
            best = result
        if result["others_during"] <= QUIET["threshold"]:
            break
    return best


def _run_row_once(args, log, quiet=True):
    """Run one row in a fresh interpreter; -> its result dict, or {"error": ...}.

    Before: wait until other processes use at most QUIET["threshold"] cores. During: the cores the
    others used, from /proc/stat minus this row's own CPU time (its rusage): the row's noise.
    """
    quiet_before = wait_for_quiet(QUIET["threshold"], QUIET["max_wait"]) if quiet else others_cores(0.5)
    load = load_average()
    start = time.perf_counter()
    busy0, own0 = busy_cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
    spec = dict(args, max_memory_gb=QUIET["max_memory_gb"])
    python = PYTHONS.get(args.get("device", "cpu"), sys.executable)
    proc = subprocess.run([python, os.path.abspath(__file__), "--row", json.dumps(spec)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    own1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = (own1.ru_utime + own1.ru_stime) - (own0.ru_utime + own0.ru_stime)
    others = max(0.0, (busy_cpu_seconds() - busy0 - own) / wall)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        result = {"error": f"exit {proc.returncode}: {' | '.join(tail)[-300:]}"}
    else:
        result = json.loads(line[len("RESULT "):])
    result.update(load_before=load, others_before=quiet_before, others_during=others, wall=wall,
                  own_cores=own / wall)
    log.write(json.dumps({"args": args, "result": result}) + "\n")
    log.flush()
    return result


def parse_variant(variant):
    """openvino[-P][-X] -> ("openvino", P or None, X or "fp32"): the folder of variant X through OpenVINO at
    --precision P (f32, bf16 or f16; None: auto); any other variant X -> ("cpu", None, X)."""
    if not variant.startswith("openvino"):
        return "cpu", None, variant
    rest = variant.partition("-")[2]
    precision, _, folder = rest.partition("-")
    if precision not in OPENVINO_HINTS:
        precision, folder = None, rest
    return "openvino", precision, folder or "fp32"


def ensure_variants(base, variants):
    """The quantized copies, each made in a child process: ru_maxrss survives fork + exec on Linux,
    so a driver that had grown to quantizing's ~10 GB would hand that peak to every row after it."""
    paths = {"fp32": base}
    for v in variants:
        _, _, folder = parse_variant(v)
        if folder == "fp32":
            paths[v] = base
            continue
        mode, _, extra = folder.partition("-")
        out = f"{base}-{folder}"
        if not os.path.isdir(out):
            print(f"# making {out}", flush=True)
            start = time.perf_counter()
            conv = {"conv": "dynamic", "static": "static", "weights": "weights"}.get(extra, "none")
            code = ("import sys; from edge_ti.quantize import FLOAT_LAYERS, quantize_model; "
                    "quantize_model(sys.argv[1], sys.argv[2], mode=sys.argv[3], conv=sys.argv[4], "
                    "per_channel=sys.argv[5] == '1', float_layers=() if sys.argv[6] == '1' else FLOAT_LAYERS)")
            subprocess.run([sys.executable, "-c", code, base, out, mode, conv, str(int(extra in ("pc", "static"))),
                            str(int(extra == "all"))], check=True)
            print(f"#   {time.perf_counter() - start:.0f} s", flush=True)
        paths[v] = out
    return {v: paths[v] for v in ["fp32", *variants] if v in paths}


def device_of(variant):
    """A row's device argument: none for the CPU provider (so rows logged before the option still match)."""
    device, precision, _ = parse_variant(variant)
    if device == "cpu":
        return {}
    return {"device": device, **({"session": {"precision": precision}} if precision else {})}


def folder_gb(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 1e9


def main():
    parser = argparse.ArgumentParser(description="edge-ti speed benchmark (see the module docstring)")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--models", default="/work/perf-models")
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--latents", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 20])
    parser.add_argument("--variants", nargs="+", default=["fp32", "int8", "fp16"],
                        help="fp32, int8 (MatMul, the UNet's feed-forward kept float), int8-all (every MatMul), "
                             "int8-pc (per channel), int8-conv (Conv too, dynamic), "
                             "int8-static (Conv calibrated, per channel), "
                             "int8-weights (Conv weights int8, float arithmetic: quantize's default since 2026-12-01), "
                             "fp16; openvino[-P][-X]: the folder of X (P: f32, bf16, f16) "
                             "through --device openvino (needs --openvino-python)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--max-batch", type=int, default=20)
    parser.add_argument("--max-samples", type=int, default=20,
                        help="skip ort rows whose batch x (latent/32)^2 exceeds this (memory)")
    parser.add_argument("--generation", type=int, nargs="*", default=None, metavar="LATENT",
                        help="also time one training generation (20 x 4) at these latent sizes")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-session-cache", action="store_true",
                        help="no cached optimized graphs (edge_ti.session): each row optimizes its graphs itself")
    parser.add_argument("--torch-precisions", nargs="+", choices=TORCH_PRECISIONS, default=list(TORCH_PRECISIONS),
                        help="torch rows: fp32, bf16-autocast (torch.autocast), bf16 (bfloat16 weights)")
    parser.add_argument("--torch-batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--max-torch-samples", type=int, default=4,
                        help="skip torch rows whose batch x (latent/32)^2 exceeds this (memory)")
    parser.add_argument("--openvino-python", default=None,
                        help="the Python whose onnxruntime is onnxruntime-openvino, for the openvino variants "
                             "(its build cannot share a Python with the plain onnxruntime)")
    parser.add_argument("--sessions", action="store_true", help="session-option rows instead (32x32, batch 1)")
    parser.add_argument("--log", default=None, help="append every row's JSON here (default MODELS/speed-MODEL.jsonl); "
                        "rows already there are shown, not rerun")
    parser.add_argument("--fresh", action="store_true", help="rerun rows even if the log has them")
    parser.add_argument("--max-memory-gb", type=float, default=18.0,
                        help="address-space limit of each row: a row that would need more fails instead of "
                             "waking the OOM killer")
    parser.add_argument("--quiet", type=float, default=None,
                        help="before each row, wait until other processes use at most this many cores "
                             "(default: the cores the row's threads leave free + 0.3)")
    parser.add_argument("--max-wait", type=float, default=QUIET["max_wait"], help="... but no longer (seconds)")
    parser.add_argument("--tries", type=int, default=QUIET["tries"],
                        help="rerun a row disturbed by other processes (over --quiet cores) up to this often")
    args = parser.parse_args()
    if args.row:
        return child(args.row)
    if args.openvino_python:
        PYTHONS["openvino"] = args.openvino_python
    elif any(v.startswith("openvino") for v in args.variants):
        parser.error("the openvino variants need --openvino-python (a Python with onnxruntime-openvino)")
    quiet = args.quiet if args.quiet is not None else max(0, os.cpu_count() - args.threads) + 0.3
    QUIET.update(threshold=quiet, max_wait=args.max_wait, tries=args.tries, max_memory_gb=args.max_memory_gb)

    os.environ.setdefault("EDGE_TI_CACHE", os.path.join(args.models, "cache"))
    cpu = cpu_description()
    diffusers_dir = os.path.join(args.models, f"{args.model}-diffusers")
    onnx_dir = os.path.join(args.models, f"{args.model}-onnx")
    log_path = args.log or os.path.join(args.models, f"speed-{args.model}.jsonl")
    if not args.fresh:
        load_log(log_path)
    log = open(log_path, "a")
    print(f"# {' '.join(sys.argv)}")
    print(f"# cpu: {cpu['model']} (vendor {cpu['vendor']} family {cpu['family']} model {cpu['model_id']}), "
          f"{cpu['cores']} cores @ {cpu['mhz']:.0f} MHz; simd: {cpu['simd']}")
    print(f"# fp32 peak {cpu['peak_gflops']:.0f} GFLOP/s = {cpu['cores']} cores x {cpu['mhz'] / 1e3:.2f} GHz x "
          f"{cpu['flops_per_cycle']} FLOP/cycle ({cpu['peak_how']})")
    if not cpu["bf16"]:
        print("# no bf16 instructions (avx512_bf16, amx_bf16) on this CPU: torch emulates bf16, so its bf16 rows "
              "are timed at batch 1 only", flush=True)
    print(f"# onnxruntime {cpu['onnxruntime']}, threads {args.threads}, load average at start {load_average():.2f}; "
          f"a row is rerun (up to {QUIET['tries']} times) when other processes used over {QUIET['threshold']:.1f} "
          "cores during it", flush=True)
    if not args.no_torch and not os.path.isdir(diffusers_dir):
        args.no_torch = True
        print(f"# no {diffusers_dir}: the torch rows are skipped (the module docstring says how it is made)",
              flush=True)
    common = {"diffusers": diffusers_dir, "threads": args.threads, "max_batch": args.max_batch}
    if args.no_session_cache:  # SDXL: a second 10 GB copy of the UNet per variant would not fit the disk
        common["session"] = {"cache": False}

    if args.sessions:
        return session_rows(args, common, onnx_dir, log)

    flops_file = os.path.join(args.models, f"flops-{args.model}.json")  # counted once per model
    flops = json.load(open(flops_file)) if os.path.isfile(flops_file) else {}
    if not all(f"unet{L}" in flops for L in args.latents):
        flops = run_row({**common, "kind": "flops", "latents": args.latents}, log)
        if "error" in flops:
            sys.exit(f"flops row failed: {flops['error']}")
        with open(flops_file, "w") as f:
            json.dump(flops, f)
    print(f"# GFLOPs: text encoder (1 prompt) {flops['text'] / 1e9:.1f}; "
          + "; ".join(f"UNet {L}x{L} {flops[f'unet{L}'] / 1e9:.1f}" for L in args.latents)
          + f"; fwd+bwd = {flops['grad_factor']:.2f} x fwd", flush=True)
    gemm = run_row({**common, "kind": "gemm", "reps": 3}, log)
    if "error" not in gemm:
        print(f"# measured: torch fp32 GEMM 2048^3 on {args.threads} threads: {gemm['gflops']:.0f} GFLOP/s "
              f"({100 * gemm['gflops'] / cpu['peak_gflops']:.0f}% of the nominal peak; others used "
              f"{gemm['others_during']:.2f} cores)", flush=True)
        if gemm["gflops"] > cpu["peak_gflops"]:
            # the VM's cpuinfo shows the base clock; boost runs above it, so the nominal figure is no
            # ceiling: the measured GEMM rate is the practical peak the % column is set against
            cpu["peak_gflops"] = gemm["gflops"]
            print(f"# % of peak below = of this measured GEMM rate ({gemm['gflops']:.0f} GFLOP/s), not of the "
                  "nominal figure", flush=True)
    paths = ensure_variants(onnx_dir, args.variants)
    for v, p in paths.items():
        prep = run_row({**common, "kind": "prepare", "onnx": p, **device_of(v)}, log)
        text_gb = sum(folder_gb(os.path.join(p, part)) for part in ("text_encoder", "text_encoder_2"))
        print(f"# {v}: {p}: unet {folder_gb(os.path.join(p, 'unet')):.2f} GB, text encoder(s) {text_gb:.2f} GB, "
              f"all {folder_gb(p):.2f} GB; sessions {prep.get('seconds', float('nan')):.0f} s, "
              f"peak {prep.get('peak_rss_gb', float('nan')):.2f} GB", flush=True)

    header = ("| row | latent | batch | s / candidate eval | x grad step (time) | peak RSS GB | x grad step (RSS) "
              "| UNet s / sample | text enc. s / prompt | GFLOP/s | % of peak | other procs (cores) |")
    print(header + "\n|" + "---|" * 12, flush=True)
    results = {}

    def show(name, L, B, r, grad, work_flops):
        if "error" in r:
            print(f"| {name} | {L} | {B} | failed: {r['error']} |||||||||", flush=True)
            return
        per = r["seconds"] / r["evaluations"]
        ratio = f"{per / (grad['seconds'] / grad['evaluations']):.2f}" if grad and "error" not in grad else ""
        mem = f"{r['peak_rss_gb'] / grad['peak_rss_gb']:.2f}" if grad and "error" not in grad else ""
        unet = f"{r['unet_seconds'] / B:.3f}" if "unet_seconds" in r else ""
        text = f"{r['text_seconds'] / B:.3f}" if "text_seconds" in r else ""
        gflops = work_flops / r["seconds"] / 1e9
        print(f"| {name} | {L} | {B} | {per:.3f} | {ratio} | {r['peak_rss_gb']:.2f} | {mem} | {unet} | {text} "
              f"| {gflops:.0f} | {100 * gflops / cpu['peak_gflops']:.0f}% | {r['others_during']:.2f} |", flush=True)

    for L in args.latents:
        fwd_flops = flops[f"unet{L}"] + flops["text"]  # one candidate evaluation
        grad = None  # the unit of the ratio columns: the strongest torch gradient step per sample
        if not args.no_torch:
            rows = {}
            for kind in ("torch_grad", "torch_fwd"):
                for precision in args.torch_precisions:
                    for B in args.torch_batches:
                        if B * (L / 32) ** 2 > args.max_torch_samples:
                            continue  # activation memory: the gradient step at 32x32 batch 4 already peaks at ~7 GB
                        if precision != "fp32" and B > 1 and not cpu["bf16"]:
                            continue  # emulated bf16 is several times slower than fp32: batch 1 shows it
                        rows[(kind, precision, B)] = run_row({**common, "kind": kind, "precision": precision,
                                                              "latent": L, "batch": B, "reps": args.reps}, log)
            steps = [r for (kind, _, _), r in rows.items() if kind == "torch_grad" and "error" not in r]
            grad = min(steps, key=lambda r: r["seconds"] / r["evaluations"]) if steps else None
            for (kind, precision, B), r in rows.items():
                results[(kind, precision, L, B)] = r
                if kind == "torch_grad":
                    show(f"torch grad step {precision}", L, B, r, grad, fwd_flops * flops["grad_factor"] * B)
                else:
                    show(f"torch fwd {precision} (UNet only)", L, B, r, grad, flops[f"unet{L}"] * B)
        for v, path in paths.items():
            for B in args.batches:
                cost = B * (L / 32) ** 2  # activation memory grows with batch x pixels (x attention's tokens)
                if cost > args.max_samples:
                    print(f"| ort {v} | {L} | {B} | skipped: batch {B} x ({L}/32)^2 = {cost:.0f} > --max-samples "
                          f"{args.max_samples} (fp32 64x64 batch 4 already peaks at 13 GB) |||||||||")
                    continue
                dump = os.path.join(args.models, f"out-{args.model}-{v}-{L}.npy") if B == 1 else None
                r = run_row({**common, "kind": "ort", "onnx": path, "latent": L, "batch": B,
                             "reps": args.reps if B < 20 else 1, "dump": dump, **device_of(v)}, log)
                results[(v, L, B)] = r
                show(f"ort {v}", L, B, r, grad, fwd_flops * B)
        if args.generation and L in args.generation:
            for v in paths:
                if v.startswith("fp16"):
                    continue
                results[("generation", v, L)] = run_row({**common, "kind": "generation", "onnx": paths[v], **device_of(v),
                                                          "latent": L, "batch": 20, "triples": 4,
                                                          "alt": v == "fp32"}, log)

    generations = {k: r for k, r in results.items() if k[0] == "generation"}
    if generations:
        print("\n# one training generation: 20 candidates x 4 triples (the defaults until stop 38; since then 10 x 2), "
              "a training evaluation = one candidate on 4 triples")
        print("| variant | latent | s / generation | s / training evaluation | UNet samples | peak RSS GB "
              "| GFLOP/s | est. `edge-ti train` (5000 evaluations + held-out) | other procs (cores) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for (_, v, L), r in generations.items():
            if "error" in r:
                print(f"| {v} | {L} | failed: {r['error']} |||||||")
                continue
            samples = 20 * 4
            work = samples * flops[f"unet{L}"] + 20 * r["prompts_used"] * flops["text"]
            per = r["seconds"] / 20
            # 250 generations; every 5th, 2 contenders x 32 held-out triples (UNet batch 2 per timestep)
            heldout = 50 * 2 * 32 * r["seconds"] / samples
            total = 250 * r["seconds"] + heldout
            print(f"| {v} | {L} | {r['seconds']:.1f} | {per:.2f} | {samples} | {r['peak_rss_gb']:.2f} "
                  f"| {work / r['seconds'] / 1e9:.0f} | {total / 3600:.1f} h | {r['others_during']:.2f} |")
    summary(args, results, paths, cpu)


def summary(args, results, paths, cpu):
    from edge_ti.metrics import spearman

    print("\n# relative UNet output error vs fp32 (||y - y32|| / ||y32||, batch 1, same inputs)")
    for L in args.latents:
        ref = os.path.join(args.models, f"out-{args.model}-fp32-{L}.npy")
        if not os.path.isfile(ref):
            continue
        y32 = np.load(ref).astype(np.float64)
        for v in paths:
            out = os.path.join(args.models, f"out-{args.model}-{v}-{L}.npy")
            if v != "fp32" and os.path.isfile(out):
                y = np.load(out).astype(np.float64)
                print(f"#   {v} {L}x{L}: {np.linalg.norm(y - y32) / np.linalg.norm(y32):.4%}")
    print("# Spearman rank correlation of the population's losses vs fp32 (same candidates, same triples)")
    for key, r in results.items():
        if "losses_alt" in r:
            print(f"#   noise floor {key}: fp32 on these triples vs fp32 on the next generation's: "
                  f"rho = {spearman(np.array(r['losses']), np.array(r['losses_alt'])):.3f}")
    for key, r in results.items():
        if key[0] == "fp32" or "losses" not in r or len(r["losses"]) < 4:
            continue
        ref_key = ("generation", "fp32", key[2]) if key[0] == "generation" else ("fp32", key[1], key[2])
        ref = results.get(ref_key)
        if ref and "losses" in ref and key != ref_key:
            a, b = np.array(ref["losses"]), np.array(r["losses"])
            print(f"#   {key}: rho = {spearman(a, b):.3f} over {len(a)} candidates "
                  f"(loss spread std/mean {a.std() / a.mean():.2e})")


def session_rows(args, common, onnx_dir, log):
    """Session options side by side: 32x32 latent, batch 1, fp32 (and int8 where given)."""
    import shutil
    paths = ensure_variants(onnx_dir, args.variants)
    cache = os.path.join(os.environ["EDGE_TI_CACHE"], "sessions")
    print("| variant | session settings | load s | s / eval | UNet s | peak RSS GB | other procs (cores) |")
    print("|---|---|---|---|---|---|---|", flush=True)
    trials = [("cold cache (optimize + save)", {"cache": True}, True),
              ("warm cache (load optimized graph)", {"cache": True}, False),
              ("no cache, level all", {"cache": False}, False),
              ("no cache, level extended", {"cache": False, "optimization": "extended"}, False),
              ("no cache, level basic", {"cache": False, "optimization": "basic"}, False),
              ("warm cache, no prepacking", {"prepacking": False}, False),
              ("warm cache, no arena", {"arena": False}, False),
              ("warm cache, spinning", {"spinning": True}, False),
              ("warm cache, 1 thread", {"threads": 1}, False)]
    for v, path in paths.items():
        for name, settings, clear in trials:
            if clear:
                shutil.rmtree(cache, ignore_errors=True)
            row = {**common, "kind": "ort", "onnx": path, "latent": 32, "batch": 1, "reps": args.reps,
                   "session": {k: val for k, val in settings.items() if k != "threads"},
                   "cold": clear}  # (a cold row must not be mistaken for the warm one in the log)
            if "threads" in settings:
                row["threads"] = settings["threads"]
            r = run_row(row, log)
            if "error" in r:
                print(f"| {v} | {name} | failed: {r['error']} ||||", flush=True)
                continue
            print(f"| {v} | {name} | {r['load_seconds']:.1f} | {r['seconds']:.3f} | {r['unet_seconds']:.3f} "
                  f"| {r['peak_rss_gb']:.2f} | {r['others_during']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
