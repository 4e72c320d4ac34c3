"""The helpers of benchmarks/int8_conv_layers.py, prompt_free_prefix.py and oracle_breakdown.py, on the shipped shapes
model."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _benchmark(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_onnx_graph_and_the_torch_forward_agree_on_what_runs_before_the_prompt():
    """int8_conv_layers.conv_nodes walks the exported ONNX graph from encoder_hidden_states; the torch UNet's
    forward calls its convolutions in order, and prompt_free_prefix counts FLOPs until the first attn2. Both must
    name the same Convs upstream of the prompt, and the FLOP share must be that prefix's, not 0 or all."""
    import torch
    from diffusers import UNet2DConditionModel

    from edge_ti.shapes import model_dir
    convs, downstream = _benchmark("int8_conv_layers").conv_nodes(os.path.join(model_dir(), "unet", "model.onnx"))
    upstream_onnx = [c.strip("/").removesuffix("/Conv").replace("/", ".") for c in convs if c not in downstream]

    unet = UNet2DConditionModel.from_pretrained(os.path.join(ROOT, "export", "shapes_diffusers", "unet")).eval()
    called, entered = [], []
    first_attn2 = next(m for name, m in unet.named_modules() if name.endswith("attn2"))
    first_attn2.register_forward_pre_hook(lambda module, args: entered.append(len(called)))
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda module, args, out, name=name: called.append(name))
    prefix, total = _benchmark("prompt_free_prefix").prefix_share(unet, 8)
    assert called[:entered[0]] == upstream_onnx == [
        "conv_in", "down_blocks.0.resnets.0.conv1", "down_blocks.0.resnets.0.conv2",
        "down_blocks.0.attentions.0.proj_in"]
    assert len(convs) == len(set(called)) == 39
    assert 0.01 < prefix / total < 0.2


def test_oracle_breakdown_reads_each_prompt_and_attribute_of_the_oracle(capsys):
    import numpy as np
    import pytest

    import edge_ti
    from edge_ti.shapes import model_dir
    breakdown = _benchmark("oracle_breakdown")
    quality = breakdown.quality
    concept = quality.BY_NAME["striped-green-triangle"]
    per_concept, per_attribute, per_prompt = breakdown.breakdown(edge_ti.open_model(model_dir()), [concept], images=2)
    assert set(per_prompt) == {p.format("X") for p in quality.OBJECT_PROMPTS}
    assert set(per_attribute) == {("object", name) for name in concept.attributes}
    # every prompt draws the same number of images: the concept's accuracy is the mean of its prompts', and of its
    # attributes' (each image is scored on every attribute)
    assert per_concept[concept.name] == pytest.approx(np.mean(list(per_prompt.values())))
    assert per_concept[concept.name] == pytest.approx(np.mean(list(per_attribute.values())))
    with pytest.raises(SystemExit):
        breakdown.main([model_dir(), "--images", "0"])
    assert "--images must be >= 1" in capsys.readouterr().err


def test_sensitivity_measures_the_gauss_newton_matrix_of_residuals_linear_in_the_token():
    """benchmarks/sensitivity.py's central differences on a scorer whose residuals are linear in the searched vector,
    r_t(e) = A_t e - y_t (a known Jacobian per triple): M must be the weighted mean of A_t^T A_t, the gradient that of
    2 A_t^T r_t(e), and the anchor must reach the scorer as each candidate's last vector."""
    import numpy as np

    from edge_ti import objective
    sensitivity = _benchmark("sensitivity")
    rng = np.random.default_rng(0)
    D, T, out = 5, 6, 7
    A, y, w = rng.normal(size=(T, out, D)), rng.normal(size=(T, out)), rng.uniform(0.5, 2, T)
    anchor = rng.normal(size=(1, D)).astype(np.float32)

    class Scorer:
        def population_gram(self, candidates, triples):
            assert candidates.shape[1:] == (2, D) and np.array_equal(candidates[:, 1], np.repeat(anchor, len(candidates), 0))
            rows = triples.latent_index                                       # which triples (A_t, y_t) these are
            r = np.einsum("tod,pd->tpo", A[rows], candidates[:, 0].astype(np.float64)) - y[rows][:, None]   # (T', P, out)
            return np.einsum("t,tpo,tqo->pq", triples.weight, r, r) / out / len(rows)

    triples = objective.Triples(latent_index=np.arange(T), prompt_index=np.zeros(T, int), timesteps=np.zeros(T, int),
                                noise=np.zeros((T, 1)), weight=w)
    e = rng.normal(size=D)
    values, vectors, gradient = sensitivity.sensitivity(Scorer(), e, anchor, triples, h=1e-2, chunk=4)
    M = np.einsum("t,tod,toe->de", w, A, A) / out / T
    # float32 candidates: differences of h = 1e-2 keep ~4 digits
    np.testing.assert_allclose(vectors @ np.diag(values) @ vectors.T, M, rtol=2e-3, atol=2e-3)
    residual = np.einsum("tod,d->to", A, e) - y
    np.testing.assert_allclose(gradient, 2 * np.einsum("t,tod,to->d", w, A, residual) / out / T, rtol=2e-3, atol=2e-3)
    assert list(values) == sorted(values, reverse=True)
    assert abs(sensitivity.overlap(vectors, vectors, 3) - 1) < 1e-9
    assert abs(sensitivity.captured(vectors, 2, vectors[:, 0]) - 1) < 1e-9 and sensitivity.captured(vectors, 1, vectors[:, 1]) < 1e-9


def test_sensitivity_refuses_bad_input_in_one_line(tmp_path, capsys):
    """Not a work folder, a unit that is not an object's, a unit without its runs, --threads 0: each a one-line
    usage error (exit 2) before the model is opened."""
    import pytest
    sensitivity = _benchmark("sensitivity")
    (tmp_path / "runs" / "dotted-blue-star-0").mkdir(parents=True)
    (tmp_path / "units").mkdir()
    cases = [([str(tmp_path / "nowhere")], "no runs/ in it"),
             ([str(tmp_path)], "no main object units"),
             ([str(tmp_path), "--units", "style-dotted-black-0"], "not an object unit"),
             ([str(tmp_path), "--units", "dotted-blue-star"], "not an object unit"),
             ([str(tmp_path), "--units", "dotted-blue-star-0"], "no edge-ti.safetensors.npz"),
             ([str(tmp_path), "--threads", "0"], "--threads must be >= 1")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as stop:
            sensitivity.main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and "Traceback" not in err, (argv, err)
