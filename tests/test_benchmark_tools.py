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
