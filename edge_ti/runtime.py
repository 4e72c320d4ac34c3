"""Which onnxruntime build runs edge-ti, and the providers a --device needs from it.

onnxruntime comes in one build per accelerator (onnxruntime, onnxruntime-gpu, onnxruntime-directml,
...), and every build installs the same `onnxruntime` package folder: two in one Python leave
whichever installed last (microsoft/onnxruntime#26996). So edge-ti's base install asks for none, and
each of the extras `cpu`, `cuda`, `directml` asks for exactly one (pyproject.toml; checked on the
resolved metadata by tests/test_packaging.py). This module turns a missing or doubled build into one
line saying what to install, instead of an ImportError or a silent fall back to the CPU.
"""
import importlib
import importlib.metadata
import json

from .errors import EdgeTIError

# distribution name -> the edge-ti extra that installs it (None: a build edge-ti has no extra for)
BUILDS = {"onnxruntime": "cpu", "onnxruntime-gpu": "cuda", "onnxruntime-directml": "directml",
          "onnxruntime-openvino": "openvino", "onnxruntime-rocm": None, "onnxruntime-qnn": None,
          "onnxruntime-silicon": None, "onnxruntime-training": None}

# --device -> (its execution provider, the extra whose build has it)
DEVICES = {"cpu": ("CPUExecutionProvider", "cpu"), "cuda": ("CUDAExecutionProvider", "cuda"),
           "directml": ("DmlExecutionProvider", "directml"), "openvino": ("OpenVINOExecutionProvider", "openvino")}

INSTALL_HINT = ("pip install 'edge-ti[cpu]' (or [cuda] for an NVIDIA GPU, [directml] on Windows, "
                "[openvino] for OpenVINO on the CPU)")

# OpenVINO's inference precision hints edge-ti asks for (SessionSettings.precision)
OPENVINO_PRECISIONS = ("auto", "f32", "bf16", "f16")


def installed_builds():
    """The onnxruntime distributions installed in this Python, by name."""
    found = []
    for name in BUILDS:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def onnxruntime():
    """The onnxruntime module, or a one-line error saying which extra installs it."""
    try:
        return importlib.import_module("onnxruntime")
    except ImportError as err:
        raise EdgeTIError(f"onnxruntime is not installed ({err}): {INSTALL_HINT}") from None


def providers_for(device):
    """--device cpu|cuda|directml|openvino -> onnxruntime provider names, or a one-line error saying what
    to install (Model adds OpenVINO's options: openvino_provider)."""
    if device not in DEVICES:
        raise EdgeTIError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
    ort = onnxruntime()
    wanted, extra = DEVICES[device]
    if device == "cuda" and hasattr(ort, "preload_dlls"):
        # onnxruntime-gpu[cuda,cudnn] (the `cuda` extra) puts CUDA and cuDNN in site-packages/nvidia,
        # where the loader does not look; onnxruntime >= 1.21 loads them from there
        try:
            ort.preload_dlls()
        except Exception:  # noqa: BLE001 - a system CUDA may still serve; session creation checks
            pass
    available = ort.get_available_providers()
    if wanted not in available:
        builds = installed_builds()
        if len(builds) > 1:
            why = (f"{' and '.join(builds)} are installed together and share one folder, so only one works: "
                   f"pip uninstall -y {' '.join(builds)} && pip install 'edge-ti[{extra}]'")
        else:
            why = f"pip install 'edge-ti[{extra}]' (after pip uninstall -y {' '.join(builds) or 'onnxruntime'})"
        raise EdgeTIError(f"device {device!r} needs {wanted}, but this onnxruntime "
                          f"({', '.join(builds) or 'unknown build'}) has only {', '.join(available)}: {why}")
    return [wanted] if device == "cpu" else [wanted, "CPUExecutionProvider"]


def cpu_flags():
    """This CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return set(next((line for line in f if line.startswith("flags")), ":").split(":", 1)[1].split())
    except OSError:
        return set()


def cpu_has_bf16():
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX): OpenVINO's bf16 hint is only
    faster there (elsewhere OpenVINO ignores it and runs f32)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_has_fp16():
    """Whether this CPU computes in float16 natively (AVX512-FP16, from Sapphire Rapids on; AMX-FP16):
    OpenVINO's f16 hint runs in f16 there and in f32 elsewhere."""
    return bool(cpu_flags() & {"avx512_fp16", "amx_fp16"})


def openvino_provider(precision="auto", threads=None):
    """("OpenVINOExecutionProvider", options) for OpenVINO's CPU plugin.

    The precision goes in `load_config` as a JSON string: onnxruntime 1.24's `precision` option takes
    only FP32/ACCURACY on the CPU, and a load_config given as a dict is refused; either way onnxruntime
    drops the provider with a warning and runs on its CPU provider (check_providers turns that into an
    error). auto: bf16 where the CPU has it natively, f32 elsewhere. No `cache_dir` (OpenVINO's
    compiled-model cache): on SD 1.5 it took 7.4 GB and sessions started slower from it.
    """
    if precision not in OPENVINO_PRECISIONS:
        raise EdgeTIError(f"OpenVINO precision {precision!r}: choose one of {', '.join(OPENVINO_PRECISIONS)}")
    hint = ("bf16" if cpu_has_bf16() else "f32") if precision == "auto" else precision
    options = {"device_type": "CPU", "load_config": json.dumps({"CPU": {"INFERENCE_PRECISION_HINT": hint}})}
    if threads:
        options["num_of_threads"] = str(int(threads))
    return ("OpenVINOExecutionProvider", options)


def provider_name(provider):
    """A providers-list entry is a name or (name, options)."""
    return provider[0] if isinstance(provider, tuple) else provider


def check_providers(session, providers, path):
    """onnxruntime runs on its CPU provider, with only a warning, when the first provider fails to start
    (a GPU provider's libraries fail to load, OpenVINO refuses its options); say so instead."""
    wanted = provider_name(providers[0])
    if wanted not in session.get_providers():
        raise EdgeTIError(f"{path}: onnxruntime could not start {wanted} (the libraries it needs failed "
                          f"to load, or it refused its options) and would run on "
                          f"{', '.join(session.get_providers())} instead; --device cpu runs on the CPU")
