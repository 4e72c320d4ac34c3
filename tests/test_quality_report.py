"""benchmarks/quality.py's paired report, on made-up units (no training)."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quality():
    spec = importlib.util.spec_from_file_location("quality", os.path.join(ROOT, "benchmarks", "quality.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(acc, heldout, wall=20.0, samples=1000):
    return ({"search_seconds": wall, "process_wall": wall, "peak_rss_mb": 200.0},
            {"wall": [wall], "samples": [samples], "heldout": [heldout], "accuracy": [acc], "all": [0.0]})


def _unit(seed, group, methods, init_heldout=0.1):
    runs, ev = {}, {"init": {"wall": [0.0], "samples": [0], "heldout": [init_heldout], "accuracy": [0.4], "all": [0.0]}}
    for name, (acc, heldout) in methods.items():
        runs[name], ev[name] = _run(acc, heldout)
    return {"concept": "striped-green-triangle", "kind": "object", "seed": seed, "group": group, "runs": runs, "eval": ev}


def test_a_variant_pairs_with_a_main_method_as_its_control():
    quality = _quality()
    units = [_unit(seed, "main", {"edge-ti": (0.6, 0.09), "gradient": (0.7, 0.08)}) for seed in (0, 1)]
    units += [_unit(0, "g", {"edge-ti:noclip-defaults": (0.7, 0.09)}),
              _unit(1, "g", {"edge-ti:noclip-defaults": (0.5, 0.09)})]
    lines = quality.ablation_vs_control(units, "edge-ti")
    row = next(line for line in lines if line.startswith("| edge-ti:noclip-defaults |"))
    assert "| 2 | 0.600 | 0.600 | +0.000 ± 0.100 | 1 / 0 / 1 |" in row, row
    # a control nobody ran is said, not silently empty
    missing = quality.ablation_vs_control(units, "edge-ti:nothing")
    assert missing[-1] == "(--paired-with edge-ti:nothing: no ablation units of it)"
