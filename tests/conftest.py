"""Tiny random Stable Diffusion pipelines, built and exported with optimum once per session (no download)."""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    # keep the patched text encoders and latents of the tests out of the user's ~/.cache
    os.environ["EDGE_TI_CACHE"] = str(tmp_path_factory.mktemp("edge-ti-cache"))


def _build(tmp_path_factory, name, prediction_type):
    from edge_ti_export.onnx_export import export_pipeline
    from edge_ti_export.tiny import tiny_pipeline

    base = tmp_path_factory.mktemp(name)
    source = str(base / "diffusers")
    # text_gain: a random UNet all but ignores its prompt; amplified, a token measurably matters
    tiny_pipeline(seed=0, prediction_type=prediction_type, tokenizer_dir=str(base / "tok"),
                  text_gain=10.0).save_pretrained(source)
    onnx_dir = export_pipeline(source, str(base / "onnx"))
    return source, onnx_dir


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """(diffusers folder, ONNX folder) of an epsilon-prediction tiny pipeline."""
    return _build(tmp_path_factory, "tiny-eps", "epsilon")


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory):
    """(diffusers folder, ONNX folder) of a v-prediction tiny pipeline."""
    return _build(tmp_path_factory, "tiny-v", "v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """(diffusers folder, ONNX folder) of a tiny random SDXL pipeline (edge_ti_export.tiny.tiny_sdxl_pipeline)."""
    from edge_ti_export.onnx_export import export_pipeline
    from edge_ti_export.tiny import tiny_sdxl_pipeline

    base = tmp_path_factory.mktemp("tiny-sdxl")
    source = str(base / "diffusers")
    tiny_sdxl_pipeline(seed=0, tokenizer_dir=str(base / "tok"), text_gain=10.0).save_pretrained(source)
    return source, export_pipeline(source, str(base / "onnx"))


@pytest.fixture
def one_torch_thread():
    """Tiny torch convolutions on a shared 2-core machine: one thread is 10-40x faster than two."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def concept_dir(tmp_path_factory):
    """Three 'photos' of a concept: a red disc on a blue background, at different places."""
    from edge_ti_export.tiny import write_tiny_concept
    return write_tiny_concept(str(tmp_path_factory.mktemp("concept")))
