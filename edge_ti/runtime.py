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

from .errors import EdgeTIError

# distribution name -> the edge-ti extra that installs it (None: a build edge-ti has no extra for)
BUILDS = {"onnxruntime": "cpu", "onnxruntime-gpu": "cuda", "onnxruntime-directml": "directml",
          "onnxruntime-openvino": None, "onnxruntime-rocm": None, "onnxruntime-qnn": None,
          "onnxruntime-silicon": None, "onnxruntime-training": None}

# --device -> (its execution provider, the extra whose build has it)
DEVICES = {"cpu": ("CPUExecutionProvider", "cpu"), "cuda": ("CUDAExecutionProvider", "cuda"),
           "directml": ("DmlExecutionProvider", "directml")}

INSTALL_HINT = "pip install 'edge-ti[cpu]' (or [cuda] for an NVIDIA GPU, [directml] on Windows)"


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
    """--device cpu|cuda|directml -> onnxruntime providers, or a one-line error saying what to install."""
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


def check_providers(session, providers, path):
    """onnxruntime falls back to the CPU when a GPU provider's libraries fail to load; say so instead."""
    if providers[0] not in session.get_providers():
        raise EdgeTIError(f"{path}: onnxruntime could not start {providers[0]} (the libraries it needs failed "
                          f"to load) and would run on {', '.join(session.get_providers())} instead; "
                          f"--device cpu runs on the CPU")
