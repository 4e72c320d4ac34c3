"""Ray workers: generation time vs actors on this machine, then a simulation of bigger clusters.

    python benchmarks/scaling.py [MODEL_DIR] [--popsize 20] [--triples 4] [--generations 8]

Without MODEL_DIR it builds the tests' tiny model (needs the export extra). It measures, all with
1-thread onnxruntime sessions:
  1. t(c): the seconds one actor needs to score a chunk of c candidates (in this process), fitted
     as t(c) = a + b c;
  2. the per-message costs: a driver<->actor round trip (a score message carrying one candidate,
     less the scoring seconds the actor reports), and the driver's own CPU seconds per chunk inside
     RayPool.population_loss (serial: one driver);
  3. the per-generation driver costs: cma ask + tell at dim 256 for each popsize, ray.put(triples);
  4. a generation's wall time with a local Ray of 1 and 2 one-thread actors, in-process, and in 1
     and 2 plain processes at once (what this machine's cores give without Ray);
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
from edge_ti.ray_pool import RayPool
from edge_ti.workers import InProcess

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


def _score_alone(job):
    """In a fresh process: the median in-process generation (1 thread), after a barrier so all start together."""
    model_dir, P, n_triples, repeat, barrier = job
    model = edge_ti.open_model(model_dir, threads=1)
    prompt_ids, latents, triples, candidates = problem(model, P, n_triples)
    scorer = InProcess(model, prompt_ids, latents, 20)
    scorer.population_loss(candidates, triples)
    barrier.wait()
    return best_of(lambda: scorer.population_loss(candidates, triples), repeat)[0]


def concurrent_in_process(model_dir, n, P, n_triples, repeat):
    """Median generation of n plain processes scoring at once, no Ray: what this machine's cores give."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        barrier = manager.Barrier(n)
        with context.Pool(n) as pool:
            return float(np.median(pool.map(_score_alone, [(model_dir, P, n_triples, repeat, barrier)] * n)))


def best_of(f, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), float(np.min(times))


def message_round_trip(actor, candidates, triples_ref, repeat=200):
    """Median seconds a score message costs beyond its work: the driver's wall time from sending
    `actor.score` to holding its answer, less the scoring seconds the actor reports."""
    import ray
    ray.get(actor.score.remote(candidates, triples_ref))
    overheads = []
    for _ in range(repeat):
        start = time.perf_counter()
        _, seconds = ray.get(actor.score.remote(candidates, triples_ref))
        overheads.append(time.perf_counter() - start - seconds)
    return float(np.median(overheads))


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


def where_it_stops(P, t_chunk, driver_per_chunk, round_trip, per_generation, most=2000):
    """(floor seconds, fewest workers within 10% of it, what bounds it) over 1..most workers."""
    walls = {}
    W = 1
    while W <= most:
        walls[W] = simulate(P, W, auto_chunk(P, W), t_chunk, driver_per_chunk, round_trip, per_generation)
        W = W + 1 if W < 32 else int(W * 1.25)
    floor = min(w for w, _ in walls.values())
    W_stop = min(W for W, (w, _) in walls.items() if w <= 1.1 * floor)
    busy = walls[W_stop][1]
    return floor, W_stop, "driver" if busy > 0.5 else "population" if W_stop >= P / 1.1 else "work"


def measure_pool(pool, candidates, triples, chunk, generations, into):
    """Run `generations` generations at `chunk`; add walls, compute, chunks and driver CPU seconds to INTO."""
    pool.chunk = chunk
    pool.population_loss(candidates, triples)                  # warm at this chunk size
    compute0, cpu0 = pool.compute_seconds, time.process_time()
    for _ in range(generations):
        start = time.perf_counter()
        pool.population_loss(candidates, triples)
        into["walls"].append(time.perf_counter() - start)
    into["compute"] += (pool.compute_seconds - compute0) / len(pool._slots)   # per actor
    into["chunks"] += math.ceil(len(candidates) / chunk) * generations
    into["cpu"] += time.process_time() - cpu0


def summary(m, workers):
    """-> generation wall median, compute s/chunk, other wall s/chunk, driver CPU s/chunk."""
    per_chunk = workers / m["chunks"]                          # chunks one actor ran
    return (float(np.median(m["walls"])), m["compute"] * per_chunk, (sum(m["walls"]) - m["compute"]) * per_chunk,
            m["cpu"] / m["chunks"])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir", nargs="?", default=None)
    parser.add_argument("--popsize", type=int, default=20)
    parser.add_argument("--triples", type=int, default=4)
    parser.add_argument("--generations", type=int, default=3, help="measured generations per setting and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all settings (the load drifts)")
    parser.add_argument("--dim", type=int, default=256, help="z dimension for the cma ask/tell cost")
    parser.add_argument("--sim-popsizes", type=int, nargs="+", default=[20, 100, 500])
    parser.add_argument("--sim-workers", type=int, nargs="+", default=[1, 2, 4, 20, 100])
    parser.add_argument("--eval-scales", type=float, nargs="+", default=[1, 100],
                        help="also simulate with t(c) times these factors (a heavier model, same overheads)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before Ray's import: 127.0.0.1 only
    import ray

    tmp = tempfile.TemporaryDirectory()
    os.environ.setdefault("EDGE_TI_CACHE", os.path.join(tmp.name, "cache"))
    model_dir = args.model_dir or build_tiny(tmp.name)
    model = edge_ti.open_model(model_dir, threads=1)
    P, G = args.popsize, args.generations
    prompt_ids, latents, triples, candidates = problem(model, P, args.triples)
    print(f"model {args.model_dir or 'tiny (tests/conftest.py: tiny_pipeline(text_gain=10.0))'}, "
          f"latent {tuple(latents.shape[1:])}, popsize {P}, {args.triples} triples/generation, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")

    inproc = InProcess(model, prompt_ids, latents, 20)
    inproc.population_loss(candidates, triples)                # sessions, patched text encoder
    inproc_walls = []
    sizes = {1: sorted({1, 2, 5, P}), 2: sorted({1, auto_chunk(P, 2)})}
    runs = {(W, c): {"walls": [], "compute": 0.0, "chunks": 0, "cpu": 0.0} for W in sizes for c in sizes[W]}
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=128 << 20,
             _node_ip_address="127.0.0.1", log_to_driver=False, logging_level="warning")
    try:
        # the load of a shared machine drifts: measure in rounds, each setting a few generations a round
        for _ in range(args.rounds):
            inproc_walls += [best_of(lambda: inproc.population_loss(candidates, triples), 1)[0]
                             for _ in range(G)]
            for W in (1, 2):
                pool = RayPool(model, prompt_ids, latents, 20, workers=W)
                try:
                    for c in sizes[W]:
                        measure_pool(pool, candidates, triples, c, G, runs[W, c])
                    if W == 1:
                        round_trip = message_round_trip(pool._slots[0].actor, candidates[:1], ray.put(triples))
                finally:
                    pool.close()
        triples_put = best_of(lambda: ray.put(triples), 50)[0]
    finally:
        ray.shutdown()
    alone = {n: concurrent_in_process(model_dir, n, P, args.triples, args.rounds * G) for n in (1, 2)}
    one = {c: summary(runs[1, c], 1) for c in sizes[1]}
    two = {c: summary(runs[2, c], 2) for c in sizes[2]}
    inproc_wall = float(np.median(inproc_walls))

    b, a = np.polyfit(sizes[1], [one[c][1] for c in sizes[1]], 1)   # t(c) = a + b c
    a = max(a, 0.0)
    t_chunk = lambda c: a + b * c  # noqa: E731
    driver_per_chunk = one[1][3]
    print(f"\nper candidate evaluation inside a 1-thread actor (b): {b * 1e3:.2f} ms; per chunk (a): {a * 1e3:.2f} ms")
    print(f"round trip driver<->actor, a score message carrying one candidate less its scoring "
          f"(median of 200): {round_trip * 1e3:.2f} ms")
    print(f"driver CPU per chunk in RayPool.population_loss (chunk 1, 1 actor): {driver_per_chunk * 1e3:.2f} ms")
    print(f"ray.put(triples) per generation: {triples_put * 1e3:.3f} ms")

    print(f"\nmeasured generation on this machine (1-thread sessions; medians of {args.rounds} rounds x {G} "
          "generations); simulated = the model below with these costs")
    print("| scorer | chunk | generation ms (median) | compute ms/chunk | other wall ms/chunk | "
          "driver CPU ms/chunk | simulated ms |\n|---|---|---|---|---|---|---|")
    print(f"| in-process | {P} | {inproc_wall * 1e3:.1f} | | | | |")
    for n, wall in alone.items():
        print(f"| in-process, {n} plain process(es) at once, no Ray | {P} | {wall * 1e3:.1f} | | | | |")
    for W, results in ((1, one), (2, two)):
        for c, (wall, compute, other, cpu) in results.items():
            sim = simulate(P, W, c, t_chunk, driver_per_chunk, round_trip, triples_put)[0]
            print(f"| Ray, {W} actor(s) | {c} | {wall * 1e3:.1f} | {compute * 1e3:.2f} | {other * 1e3:.2f} | "
                  f"{cpu * 1e3:.2f} | {sim * 1e3:.1f} |")

    def ask_tell(popsize):
        es = cma.CMAEvolutionStrategy(np.zeros(args.dim), 0.5, {"popsize": popsize, "seed": 1, "verbose": -9})

        def one_generation():
            zs = es.ask()
            es.tell(zs, [float(np.sum(np.square(z))) for z in zs])
        one_generation()
        return best_of(one_generation, 5)[0]

    cma_costs = {p: ask_tell(p) for p in args.sim_popsizes}
    for scale in args.eval_scales:
        label = "the measured t(c)" if scale == 1 else f"t(c) x {scale:g} (a heavier model; overheads as measured)"
        print(f"\nsimulated generation ms (speedup over 1 worker), {label}; auto chunk; per generation the driver "
              f"also runs cma ask + tell at dim {args.dim}")
        print("| popsize | cma ms | " + " | ".join(f"{W} workers" for W in args.sim_workers) +
              " | floor ms | stops scaling at | bound |")
        print("|---|---|" + "---|" * len(args.sim_workers) + "---|---|---|")
        for sim_P in args.sim_popsizes:
            scaled = lambda c: scale * t_chunk(c)  # noqa: E731
            g = cma_costs[sim_P] + triples_put
            walls = [simulate(sim_P, W, auto_chunk(sim_P, W), scaled, driver_per_chunk, round_trip, g)[0]
                     for W in args.sim_workers]
            floor, W_stop, bound = where_it_stops(sim_P, scaled, driver_per_chunk, round_trip, g)
            print(f"| {sim_P} | {cma_costs[sim_P] * 1e3:.1f} | " +
                  " | ".join(f"{w * 1e3:.0f} ({walls[0] / w:.1f}x)" for w in walls) +
                  f" | {floor * 1e3:.0f} | {W_stop} workers | {bound} |")
    print("\nstops scaling at: the fewest workers within 10% of the best time over 1..2000 workers; bound: "
          "driver = the driver is busy over half that generation (messages + cma); population = about one "
          "candidate per worker; work = neither.")
    tmp.cleanup()


if __name__ == "__main__":
    main()
