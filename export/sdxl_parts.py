"""An SDXL diffusers folder -> optimum's ONNX layout, in parts, within a 24 GB machine.

    python -m edge_ti_export.sdxl_parts DIFFUSERS_DIR OUT_DIR

optimum's export of the whole SDXL pipeline (`edge-ti export`) holds the fp32 pipeline (13.7 GB) and
then the UNet's ONNX copy (10.3 GB) at once, more than a 24 GB machine has. Here the parts go
separately, each in its own process: optimum exports the pipeline with the UNet swapped for a tiny
one of the same interface (text encoders, VAE, tokenizers and scheduler exactly as optimum writes
them, with its numerical validation), then the real UNet alone goes through torch.onnx.export with
optimum's input and output names, shapes and opset, its weights in one external data file (peak
14.8 GB for SDXL base, 15 min on 2 cores). That UNet is not validated by optimum: on the SDXL-shaped
random model (`random_sd.py sdxl`) it equalled diffusers' UNet to 3e-6 (benchmarks/results/speed.md).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

from edge_ti.files import atomic_folder

OPSET = 18   # what optimum 2.1 exports Stable Diffusion UNets with


def export_parts(source, out):
    """OUT: optimum's export of SOURCE with a tiny UNet (replaced afterwards)."""
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from optimum.exporters.onnx import main_export
    config = json.load(open(os.path.join(source, "unet", "config.json")))
    torch.manual_seed(0)
    tiny = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, in_channels=4, out_channels=4, sample_size=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=config["addition_time_embed_dim"],
        projection_class_embeddings_input_dim=config["projection_class_embeddings_input_dim"],
        cross_attention_dim=config["cross_attention_dim"], norm_num_groups=32)
    pipe = StableDiffusionXLPipeline.from_pretrained(source, unet=tiny, local_files_only=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(out))) as staging:
        pipe.save_pretrained(staging)
        del pipe
        main_export(staging, out, task="text-to-image", opset=OPSET, local_files_only=True)



def export_unet(source, out_dir):
    """SOURCE/unet -> OUT_DIR/model.onnx + model.onnx.data with optimum's names (sample, timestep,
    encoder_hidden_states, text_embeds, time_ids -> out_sample)."""
    import onnx
    import torch
    from diffusers import UNet2DConditionModel

    class Wrapped(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False,
                             added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})[0]

    unet = UNet2DConditionModel.from_pretrained(os.path.join(source, "unet")).eval()
    c = unet.config
    inputs = (torch.randn(1, 4, 64, 64), torch.tensor(500.0), torch.randn(1, 77, c.cross_attention_dim),
              torch.randn(1, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim),
              torch.randn(1, 6))
    names = ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    axes = {"sample": {0: "batch_size", 2: "height", 3: "width"},
            "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
            "text_embeds": {0: "batch_size"}, "time_ids": {0: "batch_size"},
            "out_sample": {0: "batch_size", 2: "height", 3: "width"}}
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as staging:
        path = os.path.join(staging, "model.onnx")
        with torch.no_grad():
            torch.onnx.export(Wrapped(unet), inputs, path, input_names=names, output_names=["out_sample"],
                              dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True, dynamo=False)
        del unet
        model = onnx.load(path)   # one external data file, as optimum writes it
        onnx.save(model, os.path.join(out_dir, "model.onnx"), save_as_external_data=True,
                  all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=1024)
    shutil.copy2(os.path.join(source, "unet", "config.json"), os.path.join(out_dir, "config.json"))


def main():
    source, out = sys.argv[1], sys.argv[2]
    step = sys.argv[3] if len(sys.argv) > 3 else None
    if step == "parts":
        return export_parts(source, out)
    if step == "unet":
        return export_unet(source, out)
    with atomic_folder(out) as tmp:
        # each step in its own process: the memory of one is given back before the next
        subprocess.run([sys.executable, "-m", "edge_ti_export.sdxl_parts", source, os.path.join(tmp, "parts"),
                        "parts"], check=True)
        for entry in os.listdir(os.path.join(tmp, "parts")):
            os.rename(os.path.join(tmp, "parts", entry), os.path.join(tmp, entry))
        os.rmdir(os.path.join(tmp, "parts"))
        shutil.rmtree(os.path.join(tmp, "unet"))
        subprocess.run([sys.executable, "-m", "edge_ti_export.sdxl_parts", source, os.path.join(tmp, "unet"),
                        "unet"], check=True)
    print(out)


if __name__ == "__main__":
    main()
