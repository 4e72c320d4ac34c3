"""The `edge-ti` command: parse options, call the library, print. Errors are one line, exit 1."""
import json
import logging

import click

from .embeddings import load_embedding
from .errors import EdgeTIError
from .model import PROVIDERS, open_model

DEVICE = click.option("--device", type=click.Choice(list(PROVIDERS)), default="cpu", show_default=True,
                      help="onnxruntime execution provider")


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgeTIError as err:
            raise click.ClickException(str(err)) from None


@click.group(cls=_Group)
@click.option("-v", "--verbose", is_flag=True, help="log what edge-ti does")
def cli(verbose):
    """Gradient-free textual inversion for Stable Diffusion, on onnxruntime."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")


def _export_module(name):
    try:
        import importlib
        return importlib.import_module(f"edge_ti_export.{name}")
    except ImportError as err:
        raise EdgeTIError(f"this command needs the export extra: pip install 'edge-ti[export]' ({err})") from None


@cli.command()
@click.argument("source", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--opset", type=int, default=None, help="ONNX opset (optimum's default if unset)")
def export(source, out, opset):
    """Export a local diffusers Stable Diffusion folder SOURCE to the ONNX folder OUT (optimum)."""
    _export_module("onnx_export").export_pipeline(source, out, opset=opset)
    click.echo(f"wrote {out}")


@cli.command()
@click.argument("path", type=click.Path())
@click.option("--out", type=click.Path(), default=None, help="output .safetensors (default: beside PATH)")
def convert(path, out):
    """Convert a pickled .pt/.bin embedding (diffusers or AUTOMATIC1111) to safetensors."""
    click.echo(f"wrote {_export_module('convert').convert(path, out)}")


@cli.command()
@click.argument("model_dir", type=click.Path())
@DEVICE
def info(model_dir, device):
    """Describe an ONNX model folder: vocabulary, width, resolution, scheduler."""
    model = open_model(model_dir, device=device)
    click.echo(json.dumps({
        "path": model.path, "vocab_size": model.vocab_size, "hidden_size": model.hidden_size,
        "resolution": model.resolution, "scheduler": model.scheduler_config.get("_class_name"),
        "prediction_type": model.scheduler_config.get("prediction_type", "epsilon"),
        "providers": model.providers}, indent=2))


@cli.command()
@click.argument("model_dir", type=click.Path())
@click.argument("prompt")
@click.option("--embedding", "embedding_files", multiple=True, type=click.Path(), help="embedding file(s)")
def tokenize(model_dir, prompt, embedding_files):
    """Print the token ids the text encoder sees for PROMPT."""
    model = open_model(model_dir)
    embeddings = {}
    for path in embedding_files:
        embeddings.update(model.check_embeddings(load_embedding(path), source=path))
    ids = model.tokenize([prompt], embeddings)[0]
    end = int((ids == model.tokenizer.eos_id).argmax()) + 1
    click.echo(" ".join(str(i) for i in ids[:end]))


def main():
    cli(prog_name="edge-ti")
