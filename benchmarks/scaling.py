"""Ray workers: generation time vs actors on this machine, then a simulation of bigger clusters.

    python benchmarks/scaling.py [MODEL_DIR] [--popsize 20] [--triples 4] [--generations 8]

Without MODEL_DIR it builds the tests' tiny model (needs the export extra). It measures, all with
1-thread onnxruntime sessions:
  1. t(c): the seconds one actor needs to score a chunk of c candidates (in this process), fitted
     as t(c) = a + b c;
  2. the per-message costs: a driver<->actor round trip (ping carrying a chunk's candidates), and
     the driver's own CPU seconds per chunk inside RayPool.population_loss (serial: one driver);
  3. the per-generation driver costs: cma ask + tell at dim 256 for each popsize, ray.put(triples);
  4. a generation's wall time with a local Ray of 1 and 2 one-thread actors (and in-process);
then simulates RayPool's dispatch (chunks handed out as actors answer, 2 queued per actor) with
those costs for 1 to 100 workers, and says what bounds each row: the work, the population (fewer
chunks than workers), or the driver (busy most of the generation).
"""
import argparse
import heapq
import math
import os
import tempfile
import time
import warnings

import numpy as np

import edge_ti
from edge_ti import objective
from edge_ti.train import OBJECT_TEMPLATES
from edge_ti.workers import InProcess, RayPool

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import cma


def build_tiny(folder):
    from edge_ti_export.onnx_export import export_pipeline
    from edge_ti_export.tiny import tiny_pipeline

    tiny_pipeline(seed=0, tokenizer_dir=os.path.join(folder, "tok"), text_gain=10.0).save_pretrained(
        os.path.join(folder, "diffusers"))
    return export_pipeline(os.path.join(folder, "diffusers"), os.path.join(folder, "onnx"))


def problem(model, popsize, n_triples, seed=0):
    """Prompts, 4 concept latents, one generation's triples and a population around a word."""
    rng = np.random.default_rng(seed)
    C = int(model.unet_config.get("in_channels", 4))
    h = int(model.unet_config.get("sample_size", 64))
    latents = rng.normal(size=(4, C, h, h)).astype(np.float32)                       # (N, C, h, w)
    prompts = [t.format("<c>") for t in OBJECT_TEMPLATES]
    e0 = model.token_embeddings[model.tokenizer.token_ids("cat")][:1]                # (1, D)
    prompt_ids = model.tokenize(prompts, {"<c>": e0})
    triples = objective.draw_triples(rng, n_triples, len(latents), len(prompts), 1000, latents.shape[1:])
    candidates = (e0[None] + rng.normal(0, 0.05, (popsize, *e0.shape))).astype(np.float32)  # (P, 1, D)
    return prompt_ids, latents, triples, candidates


def best_of(f, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), float(np.min(times))


# ---- the simulation: RayPool's dispatch as events ----
def simulate(P, W, chunk, t_chunk, driver_per_chunk, round_trip, per_generation, depth=2):
    """Wall seconds of one generation: P candidates in chunks of `chunk`, W one-thread workers.

    The driver is one serial server: each chunk costs it driver_per_chunk (half to send, half to take
    the answer); a message travels round_trip / 2 each way; a worker runs its chunks one after the
    other, t_chunk(c) each; the driver keeps `depth` chunks per worker in flight and sends the next
    one when an answer comes. per_generation (cma ask + tell, the triples' put) is serial too.
    """
    sizes = [min(chunk, P - s) for s in range(0, P, chunk)]
    todo = list(reversed(sizes))
    driver = per_generation
    worker_free = [0.0] * W
    answers = []                                              # (arrival at the driver, worker)
    busy = per_generation

    def send(w):
        nonlocal driver, busy
        c = todo.pop()
        driver += driver_per_chunk / 2
        busy += driver_per_chunk / 2
        start = max(driver + round_trip / 2, worker_free[w])
        worker_free[w] = start + t_chunk(c)
        heapq.heappush(answers, (worker_free[w] + round_trip / 2, w))

    for _ in range(depth):
        for w in range(W):
            if todo:
                send(w)
    while answers:
        arrival, w = heapq.heappop(answers)
        driver = max(driver, arrival) + driver_per_chunk / 2
        busy += driver_per_chunk / 2
        if todo:
            send(w)
    return driver, busy / driver


def auto_chunk(P, W):
    return max(1, P // (4 * W))                               # RayPool's default


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir", nargs="?", default=None)
    parser.add_argument("--popsize", type=int, default=20)
    parser.add_argument("--triples", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8, help="measured generations per setting")
    parser.add_argument("--dim", type=int, default=256, help="z dimension for the cma ask/tell cost")
    parser.add_argument("--sim-popsizes", type=int, nargs="+", default=[20, 100, 500])
    parser.add_argument("--sim-workers", type=int, nargs="+", default=[1, 2, 4, 20, 100])
    parser.add_argument("--eval-scales", type=float, nargs="+", default=[1, 100],
                        help="also simulate with t(c) times these factors (a heavier model, same overheads)")
    args = parser.parse_args()
    import ray

    tmp = tempfile.TemporaryDirectory()
    os.environ.setdefault("EDGE_TI_CACHE", os.path.join(tmp.name, "cache"))
    model_dir = args.model_dir or build_tiny(tmp.name)
    model = edge_ti.open_model(model_dir, threads=1)
    P = args.popsize
    prompt_ids, latents, triples, candidates = problem(model, P, args.triples)
    print(f"model {args.model_dir or 'tiny (tests/conftest.py: tiny_pipeline(text_gain=10.0))'}, "
          f"latent {tuple(latents.shape[1:])}, popsize {P}, {args.triples} triples/generation, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")

    # 1. t(c) on one thread, in this process
    scorer = InProcess(model, prompt_ids, latents, 20)
    scorer.population_loss(candidates[:2], triples)           # sessions, patched text encoder
    repeat = max(3, args.generations)
    sizes = sorted({1, 2, 5, P})
    t_of = {c: best_of(lambda: scorer.population_loss(candidates[:c], triples), repeat)[0] for c in sizes}
    b, a = np.polyfit(sizes, [t_of[c] for c in sizes], 1)
    a = max(a, 0.0)
    print("\n| chunk c | t(c) ms, median | fit a + b c |\n|---|---|---|")
    for c in sizes:
        print(f"| {c} | {t_of[c] * 1e3:.2f} | {(a + b * c) * 1e3:.2f} |")
    print(f"per candidate evaluation (b): {b * 1e3:.2f} ms; per call (a): {a * 1e3:.2f} ms")

    # 2-4. a local Ray on 127.0.0.1
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=128 << 20,
             _node_ip_address="127.0.0.1", log_to_driver=False, logging_level="warning")
    try:
        rows = []
        for W in (1, 2):
            pool = RayPool(model, prompt_ids, latents, 20, workers=W)
            try:
                pool.population_loss(candidates, triples)     # warm
                chunk = pool.chunk = auto_chunk(P, W)
                med, low = best_of(lambda: pool.population_loss(candidates, triples), args.generations)
                pool.chunk = 1                                # the driver's CPU per message, 1 candidate each
                cpu0 = time.process_time()
                med1, _ = best_of(lambda: pool.population_loss(candidates, triples), args.generations)
                cpu = (time.process_time() - cpu0) / (args.generations * P)
                if W == 1:
                    one_actor = pool._slots[0].actor
                    payload = candidates[:1]
                    ray.get(one_actor.ping.remote(payload))
                    rtt, _ = best_of(lambda: ray.get(one_actor.ping.remote(payload)), 200)
                    driver_per_chunk = cpu
                rows.append((W, chunk, med, low, med1, cpu))
            finally:
                pool.close()
        triples_put, _ = best_of(lambda: ray.put(triples), 50)
    finally:
        ray.shutdown()
    inproc = {}
    for threads in (1, 2):
        m = edge_ti.open_model(model_dir, threads=threads)
        s = InProcess(m, prompt_ids, latents, 20)
        s.population_loss(candidates, triples)
        inproc[threads] = best_of(lambda: s.population_loss(candidates, triples), args.generations)

    print(f"\nround trip driver<->actor (ping with one candidate, median of 200): {rtt * 1e3:.2f} ms")
    print(f"driver CPU per chunk inside population_loss (1 actor): {driver_per_chunk * 1e3:.2f} ms")
    print(f"ray.put(triples) per generation: {triples_put * 1e3:.3f} ms")

    # measured on this machine
    print(f"\n| scorer | chunk | generation ms, median | min | chunk=1 median | driver CPU ms/chunk | "
          f"simulated ms |\n|---|---|---|---|---|---|---|")
    t_chunk = lambda c: a + b * c  # noqa: E731
    for threads in (1, 2):
        med, low = inproc[threads]
        print(f"| in-process, {threads} thread(s) | {P} | {med * 1e3:.1f} | {low * 1e3:.1f} | | | |")
    for W, chunk, med, low, med1, cpu in rows:
        sim, _ = simulate(P, W, chunk, t_chunk, driver_per_chunk, rtt, triples_put)
        print(f"| Ray, {W} actor(s) x 1 thread | {chunk} | {med * 1e3:.1f} | {low * 1e3:.1f} | {med1 * 1e3:.1f} | "
              f"{cpu * 1e3:.2f} | {sim * 1e3:.1f} |")

    # the simulation
    def ask_tell(popsize):
        es = cma.CMAEvolutionStrategy(np.zeros(args.dim), 0.5, {"popsize": popsize, "seed": 1, "verbose": -9})
        def one():
            zs = es.ask()
            es.tell(zs, [float(np.sum(np.square(z))) for z in zs])
        one()
        return best_of(one, 5)[0]

    for scale in args.eval_scales:
        label = "measured t(c)" if scale == 1 else f"t(c) x {scale:g} (a heavier model; overheads as measured)"
        print(f"\nsimulated generation, {label}: ms (speedup over 1 worker, bound)")
        print("| popsize | cma ask+tell ms | " + " | ".join(f"{W} workers" for W in args.sim_workers) + " |")
        print("|---|---|" + "---|" * len(args.sim_workers))
        for sim_P in args.sim_popsizes:
            cma_cost = ask_tell(sim_P)
            cells, base = [], None
            for W in args.sim_workers:
                chunk = auto_chunk(sim_P, W)
                wall, driver_busy = simulate(sim_P, W, chunk, lambda c: scale * t_chunk(c), driver_per_chunk, rtt,
                                             cma_cost + triples_put)
                base = base or wall
                bound = ("driver" if driver_busy > 0.5 else "population" if math.ceil(sim_P / chunk) < 2 * W
                         else "work")
                cells.append(f"{wall * 1e3:.1f} ({base / wall:.1f}x, {bound})")
            print(f"| {sim_P} | {cma_cost * 1e3:.1f} | " + " | ".join(cells) + " |")
    print("\nbound: driver = the driver is busy over half the generation (chunks x per-chunk cost + cma); "
          "population = fewer than 2 chunks per worker (chunk is already 1 candidate: more workers idle); "
          "work = the workers' compute.")
    tmp.cleanup()


if __name__ == "__main__":
    main()
