"""benchmarks/quality.py's paired report, on made-up units (no training), and the small benchmarks beside it."""
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


def test_a_variant_pairs_with_the_control_run_in_its_own_group():
    """Two ablation groups, each with its own run of the control (two periods): each variant is paired with its
    group's, not with whichever group's was read last."""
    quality = _quality()
    units = [_unit(0, "a", {"edge-ti:control-10s": (0.5, 0.09), "edge-ti:path12": (0.6, 0.09)}),
             _unit(0, "b", {"edge-ti:control-10s": (0.8, 0.09), "edge-ti:clip4k": (0.8, 0.09)})]
    lines = quality.ablation_vs_control(units, "edge-ti:control-10s")
    rows = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| edge-ti:")}
    assert "| 1 | 0.600 | 0.500 | +0.100 ±" in rows["edge-ti:path12"], rows
    assert "| 1 | 0.800 | 0.800 | +0.000 ±" in rows["edge-ti:clip4k"], rows


def test_a_main_unit_trains_gradient_first_and_gives_edge_ti_half_its_wall_time(tmp_path, monkeypatch):
    """edge-ti@half is judged at <= 0.5x gradient TI's wall time, so edge-ti's child must be told that time:
    gradient TI trains first, and edge-ti's spec carries half of its wall time (child_train keeps the state of
    the last generation that ended by then)."""
    import argparse
    import json

    import numpy as np
    quality = _quality()
    calls = []

    def fake_child(kind, spec, log_path):
        calls.append((kind, spec))
        if kind == "train":
            with open(spec["out"] + ".json", "w") as f:
                json.dump({"wall": 30.0 if spec["method"] == "gradient" else 22.0}, f)
        else:
            with open(spec["out"], "w") as f:
                json.dump({"edge-ti": {}, "gradient": {}}, f)
        return 0, 1.0, 100.0

    monkeypatch.setattr(quality, "run_child", fake_child)
    monkeypatch.setattr(quality, "draw_concept", lambda concept, seed, k, salt: [np.zeros((8, 8, 3), np.uint8)] * k)
    args = argparse.Namespace(work=str(tmp_path), images=2, concept_seed=None, concept_kind="object", onnx="o",
                              diffusers="d", threads=1, time=20.0, fractions=[0.5], batch=4, lr=0.002, max_batch=20,
                              edge_settings="{}", heldout_images=2, heldout_triples=4, eval_images=2, eval_steps=2,
                              guidance=4.0)
    concept = quality.CONCEPTS[0]
    quality.run_unit(args, concept, 0, ["edge-ti", "gradient"], "main")
    trains = [spec for kind, spec in calls if kind == "train"]
    assert [spec["method"] for spec in trains] == ["gradient", "edge-ti"]
    assert trains[1]["half_mark"] == 15.0 and "half_mark" not in trains[0]
    # a variant trained alone gets no mark
    calls.clear()
    quality.run_unit(args, concept, 1, ["edge-ti:control"], "g")
    assert "half_mark" not in next(spec for kind, spec in calls if kind == "train")


def test_the_precision_variants_differ_from_their_control_only_in_where_they_run():
    """edge-ti:openvino-*-b400 pair with edge-ti:b400: the same search settings (none pinned to an older
    generation size or guard; all three to the start of their day, without the CLIP path of stop 46), only the
    device and precision differ, and each names its precision."""
    methods = _quality().METHODS
    control = methods["edge-ti:b400"]
    for name, precision in (("edge-ti:openvino-f32-b400", "f32"), ("edge-ti:openvino-bf16-b400", "bf16")):
        assert methods[name]["settings"] == control["settings"]
        assert (methods[name]["device"], methods[name]["precision"]) == ("openvino", precision)
    assert "device" not in control and control["settings"] == {"budget": 400, "max_time": 600, "clip_path": 0,
                                                                      "clip_line": 5, "timesteps": "uniform"}


def test_read_back_gives_each_image_its_target_attributes():
    """read_back (the evaluation's generations, read by the analyzer) gives one {attribute: right?} per image, with
    exactly the attributes the benchmark scores: a style's own plus the prompted shape. The caption words as the
    token (the oracle) draw the style's pattern and background in most images."""
    import edge_ti
    quality = _quality()
    model = edge_ti.open_model("shapes")
    concept = next(c for c in quality.CONCEPTS if c.name == "style-dotted-black")
    oracle = model.token_embeddings[model.tokenizer.token_ids(quality.oracle_text(concept))]
    hits = quality.read_back(model, concept, 0, oracle, 6, 20, 4.0)
    assert len(hits) == 6
    assert all(set(h) == {*concept.attributes, "shape"} for h in hits)
    assert sum(h["background"] for h in hits) >= 5 and sum(h["pattern"] for h in hits) >= 4, hits
    # another style's words (striped, white background) as the token: read against this style's targets
    other = next(c for c in quality.CONCEPTS if c.name == "style-striped-white")
    wrong = model.token_embeddings[model.tokenizer.token_ids(quality.oracle_text(other))]
    misses = quality.read_back(model, concept, 0, wrong, 6, 20, 4.0)
    assert sum(h["background"] for h in misses) <= 1 and sum(h["pattern"] for h in misses) <= 1, misses


def test_attributes_refuses_a_folder_that_is_not_a_work_folder(tmp_path, capsys):
    import pytest
    spec = importlib.util.spec_from_file_location("attributes", os.path.join(ROOT, "benchmarks", "attributes.py"))
    attributes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(attributes)
    with pytest.raises(SystemExit):
        attributes.main([str(tmp_path)])
    assert "no units/ folder or settings.json: not a benchmarks/quality.py work folder" in capsys.readouterr().err
    (tmp_path / "units").mkdir()               # units/ without the run's settings: still refused, no traceback
    with pytest.raises(SystemExit):
        attributes.main([str(tmp_path)])
    assert "not a benchmarks/quality.py work folder" in capsys.readouterr().err


def _benchmark(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_attribute_signal_swaps_one_word_and_the_right_words_score_lower():
    """attribute_signal.per_triple_losses: each of a style's attribute words swapped for another of its kind, all
    scored on the same triples; on the shipped model the style's own words have the lower loss against both swaps."""
    import edge_ti
    import numpy as np
    signal = _benchmark("attribute_signal")
    model = edge_ti.open_model("shapes")
    concept = next(c for c in signal.quality.CONCEPTS if c.name == "style-dotted-black")
    variants, losses, t, eps = signal.per_triple_losses(model, concept, 0, 40)
    assert variants == {"right": "dotted, black background", "pattern": "striped, black background",
                        "background": "dotted, white background"}
    assert losses.shape == (3, 40) and t.shape == (40,) and np.all((0 < eps) & (eps <= 1))  # v model: alpha_bar
    assert losses[1].mean() > losses[0].mean() and losses[2].mean() > losses[0].mean()


def test_attribute_signal_refuses_bad_options(capsys):
    import pytest
    signal = _benchmark("attribute_signal")
    for argv, message in ((["shapes", "--concepts", "style-plaid"], "unknown concept 'style-plaid'"),
                          (["shapes", "--triples", "5"], "--triples must be at least 20"),
                          (["/nonexistent/model"], "/nonexistent/model")):
        with pytest.raises(SystemExit):
            signal.main(argv)
        assert message in capsys.readouterr().err


def test_shapes_train_speed_refuses_zero_steps(capsys):
    import pytest
    speed = _benchmark("shapes_train_speed")
    for flag in ("--steps", "--rounds", "--threads"):
        with pytest.raises(SystemExit):
            speed.main([flag, "0"])
        assert "must be at least 1" in capsys.readouterr().err


def test_variants_measured_before_stop_49_keep_the_style_defaults_they_measured():
    """Stop 49 changed the style prompts' defaults (the model's own loss, no kept vector, no CLIP path): a variant
    measured before keeps the epsilon loss, the images' kept vector and the refinement where it sets none of its own;
    the defaults and their control take the defaults of the day."""
    quality = _quality()
    from edge_ti import clip_score
    assert quality.defaults_of_48("edge-ti:path-only-10s", "style", True) == {
        "loss_weighting": "eps", "anchor": "images", "clip_refine": clip_score.REFINE_AUTO}
    assert quality.defaults_of_48("edge-ti:path-only-10s", "style", False) == {"loss_weighting": "eps"}
    assert quality.defaults_of_48("edge-ti:path-only-10s", "object", True) == {"loss_weighting": "eps"}
    for name in ("edge-ti", "edge-ti:control", "edge-ti:defaults-49-10s", "gradient"):
        assert quality.defaults_of_48(name, "style", True) == {}
    # a variant's own settings win: vloss-word-1v measured the model's loss, no anchor and no refinement
    variant = quality.METHODS["edge-ti:vloss-word-1v-10s"]["settings"]
    assert {**quality.defaults_of_48("edge-ti:vloss-word-1v-10s", "style", True), **variant}["anchor"] is False
    assert {**quality.defaults_of_48("edge-ti:vloss-word-1v-10s", "style", True), **variant}["clip_refine"] == 0


def test_variants_measured_before_stop_50_keep_uniform_timesteps():
    """Stop 50 draws t by the loss's weight (--timesteps weighted, the default): every variant measured before keeps
    uniform t, stop 49's defaults (defaults-49-10s) included; the defaults, their control and stop 50's take the day's."""
    methods = _quality().METHODS
    for name in ("edge-ti:defaults-49-10s", "edge-ti:vloss-path-10s", "edge-ti:path-only", "edge-ti:b400"):
        assert methods[name]["settings"]["timesteps"] == "uniform"
    for name in ("edge-ti", "edge-ti:control"):
        assert "timesteps" not in methods[name]["settings"]
    for name in ("edge-ti:wt-10s", "edge-ti:vloss-wt-path-10s"):
        assert methods[name]["settings"]["timesteps"] == "weighted"
    assert "timesteps" not in methods["gradient"]["settings"]


def test_attributes_geometry_measures_each_token_against_the_init_and_gradient_tis(tiny_sd, tmp_path, capsys):
    """--geometry: a token half along gradient TI's step and as far across it reads cos 1/sqrt(2), along = across; its
    +along token is the init plus that half step; --geometry with --path-stages is refused."""
    import json

    import numpy as np
    import pytest
    attributes = _benchmark("attributes")
    import edge_ti
    table = edge_ti.open_model(tiny_sd[1]).token_embeddings.astype(np.float64)
    init, g, across = table[0], np.zeros(table.shape[1]), np.zeros(table.shape[1])
    g[0], across[1] = 0.2, 0.1
    work = tmp_path / "work"
    run_dir = work / "runs" / "style-dotted-black-0"
    run_dir.mkdir(parents=True)
    (work / "units").mkdir()
    (work / "settings.json").write_text(json.dumps({"onnx": tiny_sd[1]}))
    wall = {"gradient": [5.0, 10.0], "edge-ti": [2.0, 4.0]}
    (work / "units" / "style-dotted-black-0-main.json").write_text(json.dumps(
        {"group": "main", "kind": "style", "concept": "style-dotted-black", "seed": 0,
         "eval": {name: {"wall": w} for name, w in wall.items()}}))
    for name, last in (("gradient", init + g), ("edge-ti", init + g / 2 + across)):
        np.savez(run_dir / f"{name}.safetensors.npz", embeddings=np.stack([[init], [last]]).astype(np.float32),
                 init=init[None].astype(np.float32))
    attributes.main([str(work), "--geometry", "--methods", "gradient", "edge-ti"])
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| gradient") or line.startswith("| edge-ti")}
    distance, _, cos, along, off = (float(x) for x in rows["edge-ti"][:5])
    assert distance == pytest.approx(np.sqrt(0.02), abs=2e-3) and cos == pytest.approx(0.5 ** 0.5, abs=2e-3)
    assert along == pytest.approx(0.1, abs=2e-3) and off == pytest.approx(0.1, abs=2e-3)
    assert float(rows["gradient"][2]) == pytest.approx(1.0) and float(rows["gradient"][4]) == pytest.approx(0.0)
    unit = json.loads((work / "units" / "style-dotted-black-0-main.json").read_text())
    along = attributes.snapshot(unit, str(run_dir), "edge-ti+along")        # its step across gradient TI's removed
    np.testing.assert_allclose(along[0], init + g / 2, atol=1e-6)
    assert attributes.snapshot(unit, str(run_dir), "gradient+along") is not None
    with pytest.raises(SystemExit):
        attributes.main([str(work), "--geometry", "--path-stages"])
    assert "choose one" in capsys.readouterr().err


def test_every_child_holds_numpy_s_blas_to_its_thread_count(tmp_path, monkeypatch):
    """A training child given 1 thread must not let OpenBLAS start one per core (stop 52: with two workers that cost
    edge-ti ~30% of its generations): run_child starts it with the BLAS and OpenMP thread variables at its count,
    the rest of the environment kept."""
    quality = _quality()
    started = {}

    class FakeChild:
        pid, returncode = 12345, None

        def __init__(self, argv, stdout, stderr, env):
            started.update(argv=argv, env=env)

    class Usage:
        ru_maxrss = 1024

    monkeypatch.setenv("SOME_SETTING", "kept")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "8")
    monkeypatch.setattr(quality.subprocess, "Popen", FakeChild)
    monkeypatch.setattr(quality.os, "wait4", lambda pid, options: (pid, 0, Usage()))
    code, _, rss = quality.run_child("train", {"threads": 1, "method": "edge-ti"}, str(tmp_path / "child.log"))
    assert code == 0 and rss == 1.0
    assert {name: started["env"][name] for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")} == {
        "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    assert started["env"]["SOME_SETTING"] == "kept" and "--child" in started["argv"]
    quality.run_child("eval", {"threads": 2}, str(tmp_path / "eval.log"))
    assert started["env"]["OPENBLAS_NUM_THREADS"] == "2"
