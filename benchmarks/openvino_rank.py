"""Does --device openvino rank a training generation's candidates as the CPU provider's fp32 does? (issue 17)

    .venv-openvino/bin/python benchmarks/openvino_rank.py [--generations 16] [--truth 256]   # onnxruntime-openvino

OpenVINO's `auto` precision is bf16 on a CPU with AVX512-BF16 or AMX (edge_ti.runtime.openvino_provider),
f32 elsewhere. On the trained shapes-world model: int8_layers.py's generations (20 candidates around the
init word, 4 triples each, every loss in the trainer's epsilon units), scored by the CPU provider in fp32
(the reference) and by OpenVINO at f32, bf16 and f16 (bf16 and f16 only where the CPU computes them
natively: AVX512-BF16/AMX, AVX512-FP16);
Spearman's rho with the reference, mean and min over the generations, and the largest relative change of
a loss.

--truth N adds what the search needs: each generation's candidates scored by the CPU provider in fp32 on N
other triples (the "truth", as in benchmarks/signal_per_sample.py), and every scorer's rho with that truth
from the generation's 4 triples. Agreement with fp32 on the same 4 triples is a proxy; a precision that
reorders candidates only where 4 triples cannot tell them apart anyway leaves the search as it was.
"""
import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--truth", type=int, default=0, help="triples of each generation's truth (0: none)")
    args = parser.parse_args()
    os.environ.setdefault("EDGE_TI_SESSION_CACHE", "0")
    import edge_ti
    from edge_ti import objective, runtime
    from edge_ti.denoiser import Denoiser
    from edge_ti.metrics import spearman
    from edge_ti.session import SessionSettings
    from edge_ti.shapes import model_dir
    from int8_layers import generations
    base = model_dir()
    cpu = edge_ti.open_model(base, threads=2)
    gens = generations(cpu, args.generations, 0)
    for _, _, _, triples in gens:  # the trainer's weighting (edge_ti.train): a v model's loss in epsilon units
        triples.weight = Denoiser(cpu).eps_weight(triples.timesteps)

    def losses(model, which=None):
        return [objective.population_loss(Denoiser(model), c, ids, lat, tr)
                for c, ids, lat, tr in (which or gens)]
    reference = losses(cpu)
    truth = None
    if args.truth:
        rng = np.random.default_rng(1)
        truth_gens = []
        for c, ids, lat, tr in gens:
            t = objective.draw_triples(rng, args.truth, len(lat), len(ids), len(Denoiser(cpu).alphas_bar), lat.shape[1:])
            t.weight = Denoiser(cpu).eps_weight(t.timesteps)
            truth_gens.append((c, ids, lat, t))
        truth = losses(cpu, truth_gens)

    def vs_truth(got):
        if truth is None:
            return ""
        rhos = [spearman(a, b) for a, b in zip(truth, got)]
        return f" {np.mean(rhos):.3f}, {np.min(rhos):.3f} |"
    print(f"# {' '.join(sys.argv)}\n# {base}: {args.generations} generations x 20 candidates x 4 triples; "
          f"CPU bf16: {runtime.cpu_has_bf16()}, fp16: {runtime.cpu_has_fp16()}" + (f"; truth: {args.truth} other triples, CPU fp32" if truth else ""))
    truth_head = (" rho vs the truth (mean, min) |", "---|") if truth else ("", "")
    print(f"| scorer | rho vs CPU fp32 (mean, min) | largest relative loss change |{truth_head[0]}\n"
          f"|---|---|---|{truth_head[1]}")
    if truth:
        print(f"| CPU fp32 | 1.000, 1.000 | 0 |{vs_truth(reference)}", flush=True)
    precisions = ["f32"] + ["bf16"] * runtime.cpu_has_bf16() + ["f16"] * runtime.cpu_has_fp16()
    for precision in precisions:
        model = edge_ti.open_model(base, device="openvino", threads=2,
                                   session_settings=SessionSettings(cache=False, precision=precision))
        got = losses(model)
        rhos = [spearman(a, b) for a, b in zip(reference, got)]
        change = max(float(np.abs(a / b - 1).max()) for a, b in zip(got, reference))
        print(f"| OpenVINO {precision} | {np.mean(rhos):.3f}, {np.min(rhos):.3f} | {change:.1e} |{vs_truth(got)}",
              flush=True)


if __name__ == "__main__":
    main()
