"""The `edge-ti` command: parse options, call the library, print. Errors are one line, exit 1."""
import contextlib
import json
import logging
import math
import os
import re
import signal
import sys
import time

import click

from .clip_score import REFINE_AUTO
from .demo import BUDGET as DEMO_BUDGET
from .embeddings import MAX_VECTORS, load_embedding
from .errors import EdgeTIError
from .model import open_model
from .runtime import DEVICES, OPENVINO_PRECISIONS
from .session import SessionSettings
from .schedulers import SAMPLERS
from .train import TEMPLATES, TrainSettings

# parse-time ranges: a bad option is one line before any work (edge_ti.train.check_settings repeats them)
SEED = click.IntRange(0, 2 ** 32 - 1)
STEPS = click.IntRange(1, 1000)       # at most the training schedule's 1000 timesteps
MAX_IMAGES = 256                      # per call: the latents and text states of all images are in memory at once
MAX_SIZE = 4096                       # pixels: SDXL is 1024; far beyond that a UNet call does not fit in memory


class AutoOrCount(click.ParamType):
    """"auto", or a whole number >= 0."""
    name = "auto|N"

    def convert(self, value, param, ctx):
        if value == "auto" or isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        text = str(value).strip()
        if text.isascii() and text.isdigit():
            return int(text)
        self.fail(f"{value!r} is not auto or a whole number >= 0", param, ctx)


class _Float(click.FloatRange):
    """A FloatRange that also refuses nan (every comparison with nan is false, so ranges let it in)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if math.isnan(number):
            self.fail(f"{value!r} is not a number", param, ctx)
        return number


class _NoneOrLine(click.IntRange):
    """0 (no line) or a line of 2 or more points: one point would be the init alone."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if number == 1:
            self.fail("1 is not 0 (no line) or 2 or more points (a line of one point is the init alone)", param, ctx)
        return number


CLIP_LINE = _NoneOrLine(0)
FINITE = _Float(-1e6, 1e6)
POSITIVE = _Float(0, 1e6, min_open=True)

DEVICE = click.option("--device", type=click.Choice(list(DEVICES)), default="cpu", show_default=True,
                      help="onnxruntime execution provider (openvino: OpenVINO on the CPU, with edge-ti[openvino])")
PRECISION = click.option("--precision", type=click.Choice(list(OPENVINO_PRECISIONS)), default="auto", show_default=True,
                         help="--device openvino: OpenVINO's inference precision; auto: bf16 where the CPU has it "
                              "(it ranked a trained model's candidates at Spearman 0.8-0.9 against f32's 1.000; "
                              "f16, on a CPU with AVX512-FP16, at 0.99 but 2.3x slower than bf16)")


def _open(model_dir, device, precision, threads=None):
    """open_model with --precision: OpenVINO's hint, refused (one line) on any other device."""
    settings = None if precision == "auto" else SessionSettings(precision=precision)
    return open_model(model_dir, device=device, threads=threads, session_settings=settings)


class _Group(click.Group):
    def main(self, *args, **kwargs):
        """Usage errors as one line too ("Error: edge-ti train: Invalid value for '--popsize': ...")."""
        try:
            return super().main(*args, **{**kwargs, "standalone_mode": False})
        except click.UsageError as err:
            command = err.ctx.command_path if err.ctx else "edge-ti"
            click.echo(f"Error: {command}: {err.format_message()} (see {command} --help)", err=True)
            sys.exit(err.exit_code)
        except click.ClickException as err:
            err.show()
            sys.exit(err.exit_code)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgeTIError as err:
            raise click.ClickException(str(err)) from None
        except KeyboardInterrupt:  # Ctrl-C outside training: nothing half-written (atomic writes)
            click.echo("interrupted", err=True)
            ctx.exit(130)


@contextlib.contextmanager
def _termination_as_interrupt():
    """`kill PID` and a closed terminal stop a run as Ctrl-C does: the best embedding is written."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    names = [name for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {name: signal.signal(getattr(signal, name), handler) for name in names}
    try:
        yield
    finally:
        for name, old in previous.items():
            signal.signal(getattr(signal, name), old)


class Progress:
    """A progress bar on a terminal; elsewhere (nohup, a log file) one line every EVERY seconds.

    total: the work's size (None or 0 while unknown: lines without an ETA)."""
    EVERY = 30.0

    def __init__(self, total, label, describe=lambda: ""):
        self.total, self.label, self.describe = total, label, describe
        self.position, self.bar, self.last, self.first = 0, None, None, None

    def __enter__(self):
        self.start = time.monotonic()
        return self

    def update(self, position, total=None):
        """Move to POSITION (of TOTAL, when the work knows it only once it runs)."""
        self.total = total or self.total
        if self.first is None:  # a resumed run starts part way: its rate counts from here
            self.first, self.first_time = position, time.monotonic()
            if sys.stderr.isatty() and self.total:  # a total of 0 is unknown: lines, without an ETA
                label = self.label + (f" (from {position})" if position else "")
                self.bar = click.progressbar(length=max(self.total - position, 1), label=label, file=sys.stderr,
                                             show_eta=True, show_percent=True,
                                             item_show_func=lambda _: self.describe())
                self.bar.__enter__()
        if self.bar is not None:
            self.bar.update(position - self.first - self.bar.pos, True)
        elif self.last is None or time.monotonic() - self.last >= self.EVERY:
            self.last = time.monotonic()
            self._line(position)
        self.position = position

    def _line(self, position):
        now = time.monotonic()
        elapsed, done = now - self.start, position - self.first
        eta = (f", ETA {_clock((now - self.first_time) / done * (self.total - position))}"
               if done > 0 and self.total and position < self.total else "")
        detail = self.describe()
        click.echo(f"{self.label}: {position}{f'/{self.total}' if self.total else ''}{eta}, {_clock(elapsed)} elapsed"
                   + (f"; {detail}" if detail else ""), err=True)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        elif exc[0] is None and self.last is not None and self.position != self.total:
            self._line(self.position)


def _clock(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


@click.group(cls=_Group)
@click.option("-v", "--verbose", is_flag=True, help="log what edge-ti does")
def cli(verbose):
    """Gradient-free textual inversion for Stable Diffusion, on onnxruntime."""
    # force: a CLI call owns the process's logging (and writes to the stderr of this call)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s", force=True)


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
@click.option("--quantize", "quantize_mode", type=click.Choice(["int8"]), default=None,
              help="write OUT with an int8 UNet and text encoder (see `edge-ti quantize`)")
@click.option("--fp16", is_flag=True, help="write OUT with a float16 UNet and text encoder (CUDA / DirectML)")
def export(source, out, opset, clip_dir, quantize_mode, fp16):
    """Export a local diffusers Stable Diffusion folder SOURCE to the ONNX folder OUT (optimum)."""
    if quantize_mode and fp16:
        raise EdgeTIError("choose one of --quantize int8 and --fp16")
    _export_module("onnx_export").export_pipeline(source, out, opset=opset, clip_source=clip_dir,
                                                  quantize="fp16" if fp16 else quantize_mode)
    click.echo(f"wrote {out}")


@cli.command()
@click.argument("model_dir", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--mode", type=click.Choice(["int8", "fp16"]), default="int8", show_default=True)
@click.option("--conv", type=click.Choice(["none", "weights", "static", "dynamic"]), default="weights",
              show_default=True,
              help="int8 Conv: int8 weights, float arithmetic (weights: SD 1.5 trains in 2.8 GB instead of "
                   "4.4, ~6% slower, ranks like none); kept float (none); calibrated on UNet inputs (static: "
                   "~2x faster on SD 1.5, but ranks candidates less like fp32); quantized at run time "
                   "(dynamic: slower)")
@click.option("--per-channel/--per-tensor", default=False, show_default=True, help="int8 weight scales")
@click.option("--calibration", type=click.IntRange(min=1), default=8, show_default=True,
              help="UNet inputs for --conv static")
@click.option("--feed-forward", type=click.Choice(["float", "int8"]), default="float", show_default=True,
              help="int8: the UNet's feed-forward MatMuls too (SDXL: 3.6 GB of UNet weights instead of 7.3 GB; "
                   "on the shapes-world model they ranked candidates less like fp32)")
@click.pass_context
def quantize(ctx, model_dir, out, mode, conv, per_channel, calibration, feed_forward):
    """Write OUT: a copy of the ONNX folder MODEL_DIR with the UNet and text encoder(s) in int8 or float16.

    int8 (CPU): MatMul weights int8, activations quantized at run time; Conv weights int8 with float
    arithmetic (--conv); the UNet's feed-forward MatMuls stay float unless --feed-forward int8 (in
    int8 they reorder a trained model's candidates). With --conv weights or none, weights are read one
    at a time (SDXL quantizes in ~1.5 GB); --conv static / dynamic go through onnxruntime, which
    holds the whole model.
    fp16: for CUDA / DirectML (onnxruntime's CPU provider has few float16 kernels). Check that a
    quantized folder ranks candidates like the original with benchmarks/speed.py (its Spearman
    lines) before a long run."""
    from .quantize import FLOAT_LAYERS, quantize_model
    given = [f"--{name.replace('_', '-')}" for name in ("feed_forward", "conv")
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
    if mode != "int8" and given:
        raise EdgeTIError(f"{' and '.join(given)} apply to --mode int8, not {mode}")
    quantize_model(model_dir, out, mode=mode, conv=conv, per_channel=per_channel, calibration=calibration,
                   float_layers=FLOAT_LAYERS if feed_forward == "float" else (),
                   progress=lambda part, i, n: click.echo(f"[{i}/{n}] {part}: {mode}", err=True))
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
@PRECISION
def info(model_dir, device, precision):
    """Describe an ONNX model folder: family (sd: SD 1.x/2.x, sdxl), vocabulary, width, resolution, scheduler."""
    model = _open(model_dir, device, precision)
    click.echo(json.dumps({
        "path": model.path, "family": model.family, "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "text_encoders": {p.name: p.columns.stop - p.columns.start for p in model.text_parts},
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
    embeddings = _embeddings_from_files(model, embedding_files)
    ids = model.tokenize([prompt], embeddings)[0]
    end = int((ids == model.tokenizer.eos_id).argmax()) + 1
    click.echo(" ".join(str(i) for i in ids[:end]))


def _embeddings_from_files(model, paths):
    embeddings = {}
    for path in paths:
        embeddings.update(model.check_embeddings(load_embedding(path), source=path))
    return embeddings


@cli.command()
@click.argument("model_dir", type=click.Path())
@click.argument("prompt")
@click.option("--embedding", "embedding_files", multiple=True, type=click.Path(),
              help="embedding file whose tokens PROMPT uses (repeat for several)")
@click.option("--negative", default="", help="negative prompt (the unconditional half of guidance; none on SDXL: "
              "all zeros, as diffusers)")
@click.option("--steps", type=STEPS, default=30, show_default=True, help="sampler steps")
@click.option("--guidance", type=FINITE, default=7.5, show_default=True,
              help="classifier-free guidance scale; 1 or less: no guidance")
@click.option("--sampler", type=click.Choice(list(SAMPLERS)), default="ddim", show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True, help="initial noise (and euler-a's noise)")
@click.option("--n", "n", type=click.IntRange(1, MAX_IMAGES), default=4, show_default=True, help="number of images")
@click.option("--size", type=click.IntRange(8, MAX_SIZE), default=None,
              help="image size in pixels [default: the model's]")
@DEVICE
@PRECISION
@click.option("--out", type=click.Path(file_okay=False), required=True, help="folder for the PNGs and the grid")
def generate(model_dir, prompt, embedding_files, negative, steps, guidance, sampler, seed, n, size, device, precision,
             out):
    """Generate images of PROMPT with the embeddings' tokens in it; write PNGs and a grid to --out."""
    from .generate import generate as generate_images, image_paths, make_grid, save_images, save_png

    from .files import check_output_path
    prefix = f"seed{seed}"
    for path in [*image_paths(out, prefix, n), os.path.join(out, f"{prefix}-grid.png")]:
        check_output_path(path)  # before the work
    model = _open(model_dir, device, precision)
    embeddings = _embeddings_from_files(model, embedding_files)
    with Progress(steps, f"{sampler}, {n} image(s), steps") as progress:
        images = generate_images(model, prompt, embeddings, negative_prompt=negative, steps=steps,
                                 guidance=guidance, sampler=sampler, seed=seed, n=n, size=size,
                                 progress=lambda i, total: progress.update(i))
    for path in save_images(images, out, prefix):
        click.echo(f"wrote {path}")
    click.echo(f"wrote {save_png(make_grid(images), os.path.join(out, f'{prefix}-grid.png'))}")


@cli.command()
@click.argument("model_dir", type=click.Path())
@click.option("--embedding", "embedding_file", required=True, type=click.Path(), help="the learned embedding")
@click.option("--images", "images", required=True, multiple=True, type=click.Path(),
              help="the concept images (files or folders)")
@click.option("--prompts", "prompts_file", type=click.Path(), default=None,
              help="a text file, one prompt per line, each with the token or {} [default: 4 photo prompts]")
@click.option("--class-word", default=None, help="the token's class for CLIP-T [default: the recorded init word]")
@click.option("--init-word", default=None, help="compare with this word's embedding [default: the recorded init]")
@click.option("--n", "n", type=click.IntRange(1, MAX_IMAGES), default=8, show_default=True, help="images per prompt")
@click.option("--steps", type=STEPS, default=30, show_default=True)
@click.option("--guidance", type=FINITE, default=7.5, show_default=True)
@click.option("--sampler", type=click.Choice(list(SAMPLERS)), default="ddim", show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@DEVICE
@PRECISION
@click.option("--json", "json_out", type=click.Path(), default=None, help="also write the results as JSON here")
def evaluate(model_dir, embedding_file, images, prompts_file, class_word, init_word, n, steps, guidance, sampler,
             seed, device, precision, json_out):
    """CLIP-I and CLIP-T of generations with the embedding, and with its initial embedding."""
    from . import init as initialization
    from .evaluate import evaluate as run_evaluation, load_for_evaluation, read_prompts
    from .files import atomic_path, check_output_path
    from .latents import image_paths, read_image

    if json_out:
        check_output_path(json_out)  # before the work
    model = _open(model_dir, device, precision)
    embedding, init_embedding, recorded_word = load_for_evaluation(model, embedding_file)
    (token, vectors), = embedding.items()
    if init_word:
        init_embedding = initialization.from_word(model, init_word, len(vectors))
    class_word = class_word or init_word or recorded_word
    if not class_word:
        raise EdgeTIError(f"{embedding_file}: no recorded init word; give --class-word (e.g. mug)")
    prompts = read_prompts(prompts_file, token) if prompts_file else None
    concept_images = [read_image(path) for path in image_paths(images)]  # a bad file fails now, not after generating
    with Progress(None, "generating, steps") as progress:
        results = run_evaluation(model, embedding, concept_images, class_word, prompts=prompts,
                                 init_embedding=init_embedding, n=n, steps=steps, guidance=guidance,
                                 sampler=sampler, seed=seed, progress=progress.update)
    click.echo(f"{'embedding':<10} {'CLIP-I':>8} {'CLIP-T':>8}")
    for name in ("init", "learned"):
        if name in results:
            click.echo(f"{name:<10} {results[name]['clip_i']:>8.4f} {results[name]['clip_t']:>8.4f}")
    if json_out:
        with atomic_path(json_out) as tmp, open(tmp, "w") as f:
            json.dump(results, f, indent=2)
        click.echo(f"wrote {json_out}")


def _read_lines(path, what):
    """A text file's non-empty lines, or a one-line error."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise EdgeTIError(f"{path}: cannot read {what} ({err})") from None
    if not lines:
        raise EdgeTIError(f"{path}: no {what}")
    return lines


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
@click.option("--init-top-k", type=click.IntRange(1), default=None,
              help="--init auto: attend only to each image's k best words")
@click.option("--vectors", type=click.IntRange(1, MAX_VECTORS), default=TrainSettings.vectors, show_default=True,
              help="vectors per token")
@click.option("--template", default=TrainSettings.template, show_default=True,
              help="object, style, or a text file of prompt templates, one per line, each with {} for the token")
@click.option("--subspace", type=click.Choice(["pca", "prior", "full"]), default=TrainSettings.subspace,
              show_default=True)
@click.option("--dim", type=click.IntRange(1), default=TrainSettings.dim, show_default=True,
              help="intrinsic dimension per vector")
@click.option("--optimizer", type=click.Choice(["cma", "gauss-newton"]), default=TrainSettings.optimizer,
              show_default=True, help="cma: CMA-ES ranks each generation's losses; gauss-newton: probes around one "
              "point, every generation's predictions summed into one quadratic model")
@click.option("--popsize", type=click.IntRange(2), default=None,
              help="candidates per generation [cma 10; gauss-newton 9: the point and 8 probes]")
@click.option("--sigma", type=POSITIVE, default=None,
              help="CMA-ES step size [0.5 in z; 0.5*std(table) for full]; gauss-newton's probe distance [0.25]; "
                   "zo-adam's pair radius [0.5] (the search's only: the CLIP climbs before it keep CMA-ES's 0.5)")
@click.option("--prior", type=POSITIVE, default=TrainSettings.prior, show_default=True,
              help="gauss-newton: how strongly the token is held near the init (30: as strongly as 30 "
                   "generations' evidence pull it away)")
@click.option("--budget", type=click.IntRange(0), default=TrainSettings.budget, show_default=True,
              help="candidate evaluations; 0: no limit (then --max-time or --patience stops the run)")
@click.option("--max-time", default=None, help="wall-time limit, e.g. 30m")
@click.option("--triples", type=click.IntRange(1), default=None,
              help="(latent, prompt, timestep, noise) samples per generation, shared by all candidates [cma 2; "
                   "gauss-newton 4]")
@click.option("--crn", type=click.Choice(["redraw", "fixed"]), default=TrainSettings.crn, show_default=True,
              help="common random numbers: new each generation, or fixed for the run")
@click.option("--loss-weighting", type=click.Choice(["auto", "eps", "model"]), default=TrainSettings.loss_weighting,
              show_default=True, help="score candidates by the epsilon loss whatever the model predicts (eps), "
              "or by the model's own loss (model: a v-prediction model's v loss, as diffusers trains); auto: model "
              "with --template style, eps otherwise")
@click.option("--timesteps", type=click.Choice(["uniform", "weighted"]), default=TrainSettings.timesteps,
              show_default=True, help="draw each sample's t in proportion to the weight the loss gives it, the "
              "losses weighed back to the same objective (weighted: on a v model's own loss, a style's by default, "
              "60% of the samples at t >= 900; otherwise the same as uniform), or uniformly (as before)")
@click.option("--clip-refine", type=AutoOrCount(), default=TrainSettings.clip_refine, show_default=True,
              help="CLIP-score evaluations before the search (text passes only), on the CLIP path (--clip-path) and "
                   "again on the line (--clip-line): the search starts where the held-out loss is lowest of the init "
                   "and those points (needs a clip/ whose text tower is the model's text encoder; "
                   f"auto: {REFINE_AUTO} where there is one, none with --template style; 0: none)")
@click.option("--clip-line", type=CLIP_LINE, default=TrainSettings.clip_line, show_default=True,
              help="points on the line from the init to the CLIP-refined token, both ends included, that join the "
                   "held-out choice of the start (0: no line and no refinement run; 5: the default of stops 39-46; "
                   "2: one end or the other, as before stop 39; a checkpoint of those versions continues with it)")
@click.option("--clip-path", type=click.IntRange(0), default=TrainSettings.clip_path, show_default=True,
              help="stages of the CLIP path: CMA-ES on the CLIP score held within 1/N, 2/N, .. 1 of 3.25 sqrt(dim) "
                   "of the init (about where gradient TI's tokens end on the shapes model); each stage's best token "
                   "joins the held-out choice of where the search starts (0: none, as before stop 46, which needs "
                   "--clip-line 2 or more; a checkpoint of those versions continues with --clip-path 0)")
@click.option("--anchor", type=click.Choice(["auto", "word", "images", "off", "on"]), default="auto", show_default=True,
              help="a last vector of the token, kept while the others are searched: word: the --init-word's embedding "
                   "(the token says \"a <learned> WORD\"; on: the same); images: the images' CLIP init (--init auto's, "
                   "needs clip/); auto: word with --init-word and --template object, else none; off: none")
@click.option("--heldout-triples", type=click.IntRange(1), default=TrainSettings.heldout_triples, show_default=True)
@click.option("--eval-every", type=click.IntRange(1), default=None,
              help="generations between held-out checks [cma 20; gauss-newton 5; a run started before stop 38, "
                   "whose checkpoint this version would not continue, used 5 with --popsize 20 --triples 4]")
@click.option("--patience", type=click.IntRange(0), default=TrainSettings.patience, show_default=True,
              help="stop when the best held-out loss gained < 0.01%% over this many checks (0: never)")
@click.option("--max-batch", type=click.IntRange(1), default=TrainSettings.max_batch,
              help="UNet samples per call [auto: 4096 latent pixels per call: 4 at 32x32 (256 px), 1 at 64x64]")
@click.option("--resolution", type=click.IntRange(8, MAX_SIZE), default=None,
              help="train on images of this many pixels [the model's: 512 for SD 1.5; 256 is ~4x faster]")
@click.option("--no-flip", is_flag=True, help="do not add mirror images")
@click.option("--seed", type=SEED, default=TrainSettings.seed, show_default=True)
@click.option("--threads", type=click.IntRange(1, 1024), default=None,
              help="onnxruntime intra-op threads; with Ray, per actor [ray-local: 1; ray: the node's CPUs]")
@DEVICE
@PRECISION
@click.option("--workers", default="in-process", show_default=True, metavar="in-process|ray|ray-local:N",
              help="where candidates are scored: here; on the Ray cluster at --ray-address (one actor per node); "
                   "or on N actors of a Ray started on this machine")
@click.option("--ray-address", default=None, help="the cluster for --workers ray [default: RAY_ADDRESS, else auto]")
@click.option("--worker-device", type=click.Choice([*DEVICES, "auto"]), default=None,
              help="the Ray actors' device [--device]; auto: CUDA on GPU nodes, one actor per GPU, CPU elsewhere")
@click.option("--resume", is_flag=True, help="insist on continuing OUT's checkpoint (a rerun continues it anyway "
              "when its settings match)")
@click.option("--restart", is_flag=True, help="discard OUT and its checkpoint and start over")
@click.option("--allow-vocabulary-token", is_flag=True,
              help="allow a --token that is already a word of the vocabulary (it takes over that word in prompts)")
@click.option("--out", required=True, type=click.Path(), help="the embedding file to write (.safetensors)")
def train(model_dir, images, token, init_word, init_mode, init_top_k, vectors, template, subspace, dim, optimizer,
          popsize, sigma, prior, budget, max_time, triples, crn, loss_weighting, timesteps, clip_refine, clip_line,
          clip_path, anchor, heldout_triples, eval_every, patience, max_batch,
          resolution, no_flip, seed, threads, device, precision, workers, ray_address, worker_device, resume, restart,
          allow_vocabulary_token, out):
    """Learn TOKEN from IMAGES (files or folders) with forward passes only; write OUT."""
    from .train import Interrupted, check_settings, output_paths, train as run_training
    from .workers import scorer_factory

    if resume and restart:
        raise EdgeTIError("choose one of --resume and --restart")
    worker_device = device if workers == "in-process" else worker_device or device
    if precision != "auto" and "openvino" not in (device, worker_device):
        raise EdgeTIError(f"precision {precision!r} is OpenVINO's setting: it needs --device openvino "
                          "(or --worker-device openvino with Ray)")
    make_scorer = scorer_factory(workers, ray_address=ray_address, threads=threads, device=worker_device,
                                 precision=precision if worker_device == "openvino" else "auto")
    if template not in TEMPLATES:
        template = _read_lines(template, "prompt templates")
    settings = TrainSettings(vectors=vectors, template=template, subspace=subspace, dim=dim, optimizer=optimizer,
                             popsize=popsize, sigma=sigma, prior=prior, budget=budget, max_time=_duration(max_time),
                             seed=seed, triples=triples, crn=crn, heldout_triples=heldout_triples,
                             eval_every=eval_every, patience=patience,
                             max_batch=max_batch, resolution=resolution, flip=not no_flip,
                             loss_weighting=loss_weighting, timesteps=timesteps, clip_refine=clip_refine,
                             clip_line=clip_line, clip_path=clip_path,
                             anchor={"on": "word", "off": False}.get(anchor, anchor))
    check_settings(settings)  # before the model folder is opened; train() checks the rest before any work
    model = _open(model_dir, device, precision if device == "openvino" else "auto", threads)

    last = {}

    def describe():
        r = last.get("record")
        return r and (f"gen {r['generation']} best {r['best_loss']:.5f} mean {r['mean_loss']:.5f} "
                      f"held-out {r['best_heldout']:.5f} {r['evaluations'] / max(r['elapsed'], 1e-9):.1f} ev/s")

    mode = "restart" if restart else "require" if resume else "auto"
    with _termination_as_interrupt(), Progress(budget or 0, "training, evaluations", describe) as progress:
        def on_generation(record, state):
            last["record"] = record
            progress.update(state.evaluations)
        try:
            result = run_training(model, images, token, out, init_word=init_word, init=init_mode,
                                  init_top_k=init_top_k, settings=settings, resume=mode, on_generation=on_generation,
                                  make_scorer=make_scorer, allow_vocabulary_token=allow_vocabulary_token)
        except Interrupted as stop:
            result = stop.result
            click.echo(f"{result.stop_reason} ({result.evaluations} evaluations): wrote the best embedding so far "
                       f"to {out} (held-out loss {result.best_heldout:.6f}); run the same command again to continue",
                       err=True)
            sys.exit(130)
    paths = output_paths(out)
    click.echo(f"{result.stop_reason}; {result.generations} generations, {result.evaluations} evaluations "
               f"(+{result.heldout_evaluations} held-out), {result.elapsed:.1f} s")
    refined = f" -> CLIP-refined {result.start_heldout:.6f}" if result.clip_refined else ""
    click.echo(f"held-out loss: init {result.init_heldout:.6f}{refined} -> learned {result.best_heldout:.6f}")
    vectors = len(result.embedding[token])
    kept = {"word": f"; its last is {init_word!r}'s embedding, kept",
            "images": f"; its last is the images' CLIP init ({', '.join(w for w, _ in result.anchor_words[:3])}), kept",
            None: ""}[result.anchor_from]
    click.echo(f"wrote {paths['embedding']} ({vectors} vector{'s' * (vectors > 1)}{kept}; log {paths['log']}, "
               f"curve {paths['curve']})")


@cli.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="edge-ti-demo", show_default=True,
              help="folder for the concept images, the embedding, generations, grids and the loss curve")
@click.option("--budget", type=click.IntRange(1), default=DEMO_BUDGET, show_default=True,
              help="candidate evaluations")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--n", "n", type=click.IntRange(1, MAX_IMAGES), default=16, show_default=True,
              help="images generated from the init and the learned token")
def demo(out_dir, budget, seed, n):
    """Learn a held-out shapes-world concept ("a striped blue star") offline, then measure it."""
    from . import demo as shapes_demo

    click.echo(f"concept: {shapes_demo.CONCEPT} (the model never saw a blue star); init word "
               f"{shapes_demo.INIT_WORD!r}; writing to {out_dir}/")
    with Progress(budget, "learning, evaluations") as progress:
        report = shapes_demo.run(out_dir, budget=budget, seed=seed, n=n,
                                 on_generation=lambda record, state: progress.update(state.evaluations))
    result = report["result"]
    click.echo(f"{result.stop_reason}; {result.evaluations} evaluations in {result.elapsed:.0f} s; "
               f"held-out loss {result.init_heldout:.5f} -> {result.best_heldout:.5f}")
    names = list(shapes_demo.CONCEPT)
    click.echo(f"analyzer accuracy of {n} generations of {shapes_demo.PROMPT.format(shapes_demo.TOKEN)!r}:")
    click.echo(f"{'':<8}" + "".join(f"{name:>9}" for name in names))
    for row in ("init", "learned"):
        click.echo(f"{row:<8}" + "".join(f"{report[row][name]:>9.2f}" for name in names))
    click.echo(report["verdict"])
    click.echo(f"wrote {out_dir}/: side-by-side.png (drawn | init | learned), concept/, init/, learned/, "
               f"init-grid.png, learned-grid.png, concept.safetensors, concept.loss.png")


def main():
    cli(prog_name="edge-ti")
