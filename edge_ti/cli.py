"""The `edge-ti` command: parse options, call the library, print. Errors are one line, exit 1."""
import json
import logging
import re
import sys

import click

from .embeddings import load_embedding
from .errors import EdgeTIError
from .model import PROVIDERS, open_model
from .train import TEMPLATES, TrainSettings

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
@click.option("--clip", "clip_dir", type=click.Path(), default=None,
              help="a local transformers CLIP folder (CLIPModel) to add as OUT/clip/, for --init auto and metrics")
def export(source, out, opset, clip_dir):
    """Export a local diffusers Stable Diffusion folder SOURCE to the ONNX folder OUT (optimum)."""
    _export_module("onnx_export").export_pipeline(source, out, opset=opset, clip_source=clip_dir)
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


def _duration(text):
    """'90', '90s', '30m', '1h30m' -> seconds."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text)
    if not match or not any(match.groups()):
        raise EdgeTIError(f"--max-time {text!r}: use e.g. 90s, 30m or 1h30m")
    h, m, s = (float(g) if g else 0.0 for g in match.groups())
    return h * 3600 + m * 60 + s


@cli.command()
@click.argument("model_dir", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--token", required=True, help='the new token, e.g. "<my-mug>"')
@click.option("--init-word", default=None, help="start from this word's embedding")
@click.option("--init", "init_mode", type=click.Choice(["word", "auto"]), default="word", show_default=True,
              help="auto: from the images through CLIP (needs clip/ in the model folder)")
@click.option("--init-top-k", type=int, default=None, help="--init auto: attend only to each image's k best words")
@click.option("--vectors", default=TrainSettings.vectors, show_default=True, help="vectors per token")
@click.option("--template", type=click.Choice(list(TEMPLATES)), default=TrainSettings.template, show_default=True)
@click.option("--subspace", type=click.Choice(["pca", "prior", "full"]), default=TrainSettings.subspace,
              show_default=True)
@click.option("--dim", default=TrainSettings.dim, show_default=True, help="intrinsic dimension per vector")
@click.option("--popsize", default=TrainSettings.popsize, show_default=True)
@click.option("--sigma", type=float, default=None, help="CMA-ES step size [0.5 in z; 0.5*std(table) for full]")
@click.option("--budget", default=TrainSettings.budget, show_default=True, help="candidate evaluations")
@click.option("--max-time", default=None, help="wall-time limit, e.g. 30m")
@click.option("--triples", default=TrainSettings.triples, show_default=True,
              help="(latent, prompt, timestep, noise) samples per generation, shared by all candidates")
@click.option("--crn", type=click.Choice(["redraw", "fixed"]), default=TrainSettings.crn, show_default=True,
              help="common random numbers: new each generation, or fixed for the run")
@click.option("--heldout-triples", default=TrainSettings.heldout_triples, show_default=True)
@click.option("--patience", default=TrainSettings.patience, show_default=True,
              help="held-out checks without improvement before stopping (0: never)")
@click.option("--max-batch", default=TrainSettings.max_batch, show_default=True, help="UNet samples per call")
@click.option("--no-flip", is_flag=True, help="do not add mirror images")
@click.option("--seed", default=TrainSettings.seed, show_default=True)
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads")
@DEVICE
@click.option("--resume", is_flag=True, help="continue from OUT's checkpoint after a crash or kill")
@click.option("--out", required=True, type=click.Path(), help="the embedding file to write (.safetensors)")
def train(model_dir, images, token, init_word, init_mode, init_top_k, vectors, template, subspace, dim, popsize, sigma,
          budget, max_time, triples, crn, heldout_triples, patience, max_batch, no_flip, seed, threads, device,
          resume, out):
    """Learn TOKEN from IMAGES (files or folders) with forward passes only; write OUT."""
    from . import init as initialization
    from .train import output_paths, train as run_training

    model = open_model(model_dir, device=device, threads=threads)
    settings = TrainSettings(vectors=vectors, template=template, subspace=subspace, dim=dim, popsize=popsize,
                             sigma=sigma, budget=budget, max_time=_duration(max_time), seed=seed, triples=triples,
                             crn=crn, heldout_triples=heldout_triples, patience=patience, max_batch=max_batch,
                             flip=not no_flip)
    init_embedding = None
    if init_mode == "auto":
        from .latents import image_paths
        init_embedding, top = initialization.from_images(model, image_paths(images), vectors, top_k=init_top_k)
        click.echo("init from images: " + ", ".join(f"{w} {x:.3f}" for w, x in top[:10]))
    elif not init_word:
        raise EdgeTIError("give --init-word WORD or --init auto")
    with click.progressbar(length=budget, label="training", show_eta=True, show_percent=True,
                           item_show_func=lambda r: r and (
                               f"gen {r['generation']} evals {r['evaluations']} best {r['best_loss']:.5f} "
                               f"mean {r['mean_loss']:.5f} held-out {r['best_heldout']:.5f} "
                               f"{r['evaluations'] / max(r['elapsed'], 1e-9):.1f} ev/s"), file=sys.stderr) as bar:
        def on_generation(record, state):
            bar.update(state.evaluations - bar.pos, record)
        result = run_training(model, images, token, out, init_word=init_word, init_embedding=init_embedding,
                              settings=settings, resume=resume, on_generation=on_generation)
    paths = output_paths(out)
    click.echo(f"{result.stop_reason}; {result.generations} generations, {result.evaluations} evaluations "
               f"(+{result.heldout_evaluations} held-out), {result.elapsed:.1f} s")
    click.echo(f"held-out loss: init {result.init_heldout:.6f} -> learned {result.best_heldout:.6f}")
    click.echo(f"wrote {paths['embedding']} (log {paths['log']}, curve {paths['curve']})")


def main():
    cli(prog_name="edge-ti")
