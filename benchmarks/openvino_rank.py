"""Does --device openvino rank a training generation's candidates as the CPU provider's fp32 does? (issue 17)

    .venv-openvino/bin/python benchmarks/openvino_rank.py [--generations 16]   # a Python with onnxruntime-openvino

OpenVINO's `auto` precision is bf16 on a CPU with AVX512-BF16 or AMX (edge_ti.runtime.openvino_provider),
f32 elsewhere. On the trained shapes-world model: int8_layers.py's generations (20 candidates around the
init word, 4 triples each), scored by the CPU provider in fp32 (the reference) and by OpenVINO at f32
and at bf16 (bf16 only where the CPU computes it natively); Spearman's rho with the reference, mean and
min over the generations, and the largest relative change of a loss.
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
    gens = generations(edge_ti.open_model(base), args.generations, 0)

    def losses(model):
        return [objective.population_loss(Denoiser(model), c, ids, lat, tr) for c, ids, lat, tr in gens]
    reference = losses(edge_ti.open_model(base, threads=2))
    print(f"# {' '.join(sys.argv)}\n# {base}: {args.generations} generations x 20 candidates x 4 triples; "
          f"CPU bf16: {runtime.cpu_has_bf16()}")
    print("| --device openvino precision | rho vs CPU fp32 (mean, min) | largest relative loss change |\n|---|---|---|")
    for precision in ("f32", "bf16") if runtime.cpu_has_bf16() else ("f32",):
        model = edge_ti.open_model(base, device="openvino", threads=2,
                                   session_settings=SessionSettings(cache=False, precision=precision))
        got = losses(model)
        rhos = [spearman(a, b) for a, b in zip(reference, got)]
        change = max(float(np.abs(a / b - 1).max()) for a, b in zip(got, reference))
        print(f"| {precision} | {np.mean(rhos):.3f}, {np.min(rhos):.3f} | {change:.1e} |", flush=True)


if __name__ == "__main__":
    main()
