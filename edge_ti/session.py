"""onnxruntime sessions for a small CPU: tuned options and a cache of optimized graphs.

    session = create_session(path, providers, SessionSettings(), cache_dir)

The first session of a model file runs onnxruntime's graph optimizations (constant folding, node
fusions, the NCHWc convolution layout) and saves the optimized graph to
    cache_dir/<key>/model.onnx (+ model.onnx.data)
keyed by the model's files (every byte: edge_ti.cache.fingerprint), the onnxruntime version, the
providers and this CPU's instruction set; later sessions load that graph with optimizations off
instead of optimizing again. The saved graph may hold layout choices for this CPU only, which is why
the CPU is part of the key. The defaults of SessionSettings were chosen by measurement
(benchmarks/results/speed.md).
"""
import hashlib
import json
import logging
import os
import platform
import shutil
from dataclasses import asdict, dataclass

from .cache import cache_error, fingerprint
from .files import remove_stale_temps, temp_name
from .runtime import check_providers, onnxruntime, provider_name

log = logging.getLogger(__name__)

# SessionSettings.optimization -> onnxruntime.GraphOptimizationLevel's member
LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
          "all": "ORT_ENABLE_ALL"}


@dataclass
class SessionSettings:
    threads: int = None           # intra-op threads; None: onnxruntime's default, one per physical core
    optimization: str = "all"     # graph optimization level; "all" adds the NCHWc conv layout (x86)
    cache: bool = True            # save the optimized graph once, load it afterwards (fast start, less peak memory)
    spinning: bool = False        # idle threads spin-wait between ops: measured no faster here, and burns a shared CPU
    arena: bool = True            # the CPU memory arena: reuses activation buffers across runs
    prepacking: bool = True       # pre-packed MatMul/Conv weights: faster GEMMs
    precision: str = "auto"       # --device openvino only: OpenVINO's inference precision hint, auto | f32 | bf16 | f16
                                  # (auto: bf16 where the CPU has it natively; edge_ti.runtime.openvino_provider)


def cpu_signature():
    """The CPU's vendor, model and instruction-set flags: what an NCHWc-optimized graph depends on."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        return "|".join(fields.get(k, "").strip() for k in ("vendor_id", "cpu family", "model", "flags"))
    except OSError:
        return f"{platform.machine()}|{platform.processor()}"


def cache_key(path, providers, settings):
    """What the optimized graph depends on: the model's files, onnxruntime, providers, level, CPU."""
    # the file's name too: one folder may hold several graphs (clip/: text_model.onnx, vision_model.onnx)
    parts = {"model": fingerprint(path), "file": os.path.basename(path), "onnxruntime": onnxruntime().__version__,
             "providers": list(providers),
             "optimization": settings.optimization, "cpu": cpu_signature()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def session_options(settings, optimized_model_path=None):
    """SessionSettings -> onnxruntime.SessionOptions; with a path, the optimized graph is saved there."""
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if settings.threads:
        options.intra_op_num_threads = settings.threads
    options.inter_op_num_threads = 1       # one op at a time (sequential execution): the ops are big
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[settings.optimization])
    options.enable_cpu_mem_arena = settings.arena
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.spinning else "0")
    if not settings.prepacking:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if optimized_model_path:
        options.optimized_model_filepath = optimized_model_path
        # weights in one external file: the optimized UNet is over protobuf's 2 GB
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         "model.onnx.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                         "1024")
    return options


def _inference_session(path, options, providers):
    model = path
    if provider_name(providers[0]) == "OpenVINOExecutionProvider":
        model = _openvino_graph(path, options)
    session = onnxruntime().InferenceSession(model, options, providers=providers)
    check_providers(session, providers, path)
    return session


def _openvino_graph(path, options):
    """PATH, or its graph as bytes with int8 weights' scales untied (edge_ti.int8_matmul): OpenVINO
    cannot compile the tied form. The weights stay in PATH's folder: options tells onnxruntime where."""
    import onnx

    from .external_data import ExternalData, attribute_tensors, is_external
    from .int8_matmul import untie_weight_scales
    graph = onnx.load(path, load_external_data=False)
    if not untie_weight_scales(graph.graph):
        return path
    source = ExternalData(path)  # from bytes, onnxruntime resolves locations against a folder: check them first
    for tensor in [*graph.graph.initializer, *attribute_tensors(graph.graph.node)]:
        if is_external(tensor):
            source.locate(tensor)
    log.info("%s: int8 weight scales untied for OpenVINO", path)
    options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                     os.path.dirname(os.path.abspath(path)))
    return graph.SerializeToString()


def create_session(path, providers, settings=None, cache_dir=None):
    """An InferenceSession of PATH; with cache_dir and settings.cache, through the optimized-graph cache."""
    settings = settings or SessionSettings()
    if not (cache_dir and settings.cache and settings.optimization != "disable"):
        return _inference_session(path, session_options(settings), providers)
    entry = os.path.join(cache_dir, cache_key(path, providers, settings))
    cached = os.path.join(entry, "model.onnx")
    if os.path.isfile(cached):
        # already optimized for this CPU: load as it is
        loaded = SessionSettings(**{**asdict(settings), "optimization": "disable"})
        try:
            session = onnxruntime().InferenceSession(cached, session_options(loaded), providers=providers)
        except Exception as err:  # a damaged cache entry: rebuild it
            log.warning("optimized graph %s unusable (%s): optimizing again", cached, str(err).splitlines()[0])
            shutil.rmtree(entry, ignore_errors=True)
        else:
            check_providers(session, providers, path)
            return session
    try:
        os.makedirs(cache_dir, exist_ok=True)
        remove_stale_temps(cache_dir)  # left by killed processes
        tmp = temp_name(cache_dir, directory=True)
    except OSError as err:
        raise cache_error(cache_dir, err) from None
    ort = onnxruntime()
    try:
        log.info("optimizing %s once -> %s", path, entry)
        try:
            session = ort.InferenceSession(path, session_options(settings, os.path.join(tmp, "model.onnx")),
                                           providers=providers)
        except Exception:
            # onnxruntime's error does not say whether reading the model or saving the optimized copy
            # failed: a load without saving tells (and raises the model's own error if it is the model)
            ort.InferenceSession(path, session_options(settings), providers=providers)
            raise cache_error(cache_dir, "onnxruntime could not save the optimized graph") from None
        check_providers(session, providers, path)
        try:
            os.rename(tmp, entry)
        except OSError:  # another process saved the same entry first: theirs is as good
            pass
        return session
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
