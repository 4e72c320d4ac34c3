"""What `pip install edge-ti[...]` asks for, read from the metadata pip reads: built from this checkout's
pyproject.toml by its build backend (setuptools' PEP 517 metadata hook), then resolved extra by extra."""
import email.parser
import os
import subprocess
import sys

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from edge_ti.runtime import BUILDS

# the onnxruntime builds: each installs the same `onnxruntime` package folder, so two of them in one
# Python leave whichever installed last (microsoft/onnxruntime#26996)
ORT_BUILDS = set(BUILDS)


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
    out = tmp_path_factory.mktemp("metadata")
    hook = "import sys; from setuptools import build_meta; print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", hook, str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    dist_info = proc.stdout.strip().splitlines()[-1]
    with open(out / dist_info / "METADATA", encoding="utf-8") as f:
        return email.parser.Parser().parse(f)


def _pulled(metadata, extras):
    """{name: Requirement} that `pip install edge-ti[extras]` asks for, following edge-ti[other] references."""
    reqs = [Requirement(r) for r in metadata.get_all("Requires-Dist")]
    wanted, todo, seen = {}, [""] + list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in reqs:
            if req.marker is None and extra != "":
                continue  # a base requirement: taken with extra ""
            if req.marker is not None and not req.marker.evaluate({"extra": extra}):
                continue
            if canonicalize_name(req.name) == "edge-ti":
                todo.extend(req.extras)
            else:
                wanted.setdefault(canonicalize_name(req.name), []).append(req)
    return wanted


# what each documented install gets: nothing without a device extra, exactly one build with one
DEVICE_EXTRAS = {"cpu": "onnxruntime", "cuda": "onnxruntime-gpu", "directml": "onnxruntime-directml",
                 "openvino": "onnxruntime-openvino"}


def test_each_device_extra_asks_for_exactly_its_onnxruntime_build(metadata):
    extras = set(metadata.get_all("Provides-Extra"))
    assert extras >= {"cpu", "cuda", "directml", "openvino", "export", "ray", "test"}
    others = sorted(extras - set(DEVICE_EXTRAS) - {"test"})
    for chosen in [()] + [(e,) for e in others] + [tuple(others)]:
        assert not set(_pulled(metadata, chosen)) & ORT_BUILDS, chosen  # the base and export, ray: none
    for device, build in DEVICE_EXTRAS.items():
        for chosen in [(device,), (device, *others)]:   # e.g. '.[cuda]' and '.[cuda,export,ray]'
            assert set(_pulled(metadata, chosen)) & ORT_BUILDS == {build}, chosen
    assert set(_pulled(metadata, ["test"])) & ORT_BUILDS == {"onnxruntime"}


def test_the_cuda_extra_brings_cuda_and_cudnn_with_the_gpu_build(metadata):
    (gpu,) = _pulled(metadata, ["cuda"])["onnxruntime-gpu"]
    # onnxruntime-gpu's own extras install CUDA and cuDNN as wheels; preload_dlls (>= 1.21) loads them
    assert gpu.extras == {"cuda", "cudnn"} and not gpu.specifier.contains("1.20.9")


def _installed_closure(metadata, extras):
    """Every distribution the installed packages ask for, transitively, starting from edge-ti[extras]:
    what pip resolved for this environment, read from each installed package's own metadata."""
    import importlib.metadata
    names, todo = set(), list(_pulled(metadata, extras).items())
    while todo:
        name, reqs = todo.pop()
        if name in names:
            continue
        names.add(name)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        chosen = set().union(*(r.extras for r in reqs))
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in chosen | {""}):
                todo.append((canonicalize_name(req.name), [req]))
    return names


def test_no_dependency_of_the_test_install_pulls_a_second_onnxruntime_build(metadata):
    # e.g. optimum-onnx has onnxruntime and onnxruntime-gpu extras: nothing here may select them
    names = _installed_closure(metadata, ["test"])
    assert {"torch", "optimum-onnx", "ray"} <= names, "the closure walk found the test extra's packages"
    assert names & ORT_BUILDS == {"onnxruntime"}


def test_the_readme_installs_a_build_with_every_pip_command():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    commands = [line.split("#")[0].strip() for line in readme.splitlines() if "pip install -e" in line]
    assert commands and commands[0].startswith("pip install -e '.[cpu]'"), commands
    for command in commands:
        extras = command.split("'.[", 1)[1].split("]'")[0].split(",") if "'.[" in command else []
        assert set(extras) & {"cpu", "cuda", "directml", "openvino", "test"}, f"README: {command!r} installs no onnxruntime"


def test_published_requirements_are_ranges_and_ci_pins_lie_inside(metadata):
    pins = {}
    for line in open(os.path.join(ROOT, ".ci", "constraints.txt"), encoding="utf-8"):
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = Version(spec.version)
    everything = _pulled(metadata, metadata.get_all("Provides-Extra"))
    installed_by_ci = _pulled(metadata, ["test"])
    for name, reqs in everything.items():
        for req in reqs:
            assert all(s.operator not in ("==", "===") for s in req.specifier), f"{req}: exact pins go in .ci/constraints.txt"
            if name not in installed_by_ci and name not in pins:
                continue  # e.g. onnxruntime-gpu: CI has no GPU and never installs it
            assert name in pins, f"{name} has no CI pin"
            assert req.specifier.contains(pins[name], prereleases=True), f"CI's {name}=={pins[name]} is outside {req}"
    assert "torch" in pins and pins["torch"] == Version("2.13.0")


def test_diffusers_floor_is_the_version_the_samplers_copy(metadata):
    (diffusers,) = _pulled(metadata, ["export"])["diffusers"]
    # edge_ti/schedulers copy diffusers 0.39's scheduler defaults; the parity tests compare against it
    assert diffusers.specifier.contains("0.39.0") and not diffusers.specifier.contains("0.38.9")


# -- at run time: a missing, doubled or failing onnxruntime build is one line that says what to install

WITHOUT_ONNXRUNTIME = """
import importlib.abc, sys
class NoOnnxruntime(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "onnxruntime" or name.startswith("onnxruntime."):
            raise ModuleNotFoundError("No module named 'onnxruntime'", name=name)
sys.meta_path.insert(0, NoOnnxruntime())
from edge_ti.cli import main
sys.argv[0] = "edge-ti"
main()
"""


@pytest.mark.parametrize("args", [["info", "shapes"], ["demo", "--out", "never-written"]])
def test_without_an_onnxruntime_build_commands_say_which_extra_to_install(args, tmp_path):
    proc = subprocess.run([sys.executable, "-c", WITHOUT_ONNXRUNTIME, *args], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "onnxruntime is not installed" in lines[0] and "edge-ti[cpu]" in lines[0], lines
    assert os.listdir(tmp_path) == []


def test_help_works_without_an_onnxruntime_build(tmp_path):
    proc = subprocess.run([sys.executable, "-c", WITHOUT_ONNXRUNTIME, "train", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0 and "--init-word" in proc.stdout, proc.stderr


def test_a_device_this_build_lacks_names_the_extra(monkeypatch):
    from edge_ti import runtime
    from edge_ti.errors import EdgeTIError
    with pytest.raises(EdgeTIError, match=r"needs CUDAExecutionProvider.*pip install 'edge-ti\[cuda\]'"):
        runtime.providers_for("cuda")
    # two builds installed together: the message names both and how to untangle them
    monkeypatch.setattr(runtime, "installed_builds", lambda: ["onnxruntime", "onnxruntime-gpu"])
    with pytest.raises(EdgeTIError) as err:
        runtime.providers_for("cuda")
    assert ("onnxruntime and onnxruntime-gpu are installed together" in str(err.value)
            and "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'edge-ti[cuda]'" in str(err.value))
    assert runtime.providers_for("cpu") == ["CPUExecutionProvider"]


def test_a_provider_that_fails_to_load_is_an_error_not_a_silent_cpu_run(tmp_path, monkeypatch):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from edge_ti import session as session_module
    from edge_ti.errors import EdgeTIError
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = str(tmp_path / "relu.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    real = session_module.onnxruntime()

    class FellBackToCpu:  # what onnxruntime-gpu does when CUDA's libraries are missing: warn, run on the CPU
        __version__ = real.__version__
        SessionOptions, GraphOptimizationLevel, ExecutionMode = (real.SessionOptions, real.GraphOptimizationLevel,
                                                                 real.ExecutionMode)

        @staticmethod
        def InferenceSession(path, options, providers):
            return real.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    monkeypatch.setattr(session_module, "onnxruntime", lambda: FellBackToCpu)
    for cache in (None, str(tmp_path / "cache"), str(tmp_path / "cache")):  # plain, optimizing, cached
        with pytest.raises(EdgeTIError, match="could not start CUDAExecutionProvider"):
            session_module.create_session(path, ["CUDAExecutionProvider", "CPUExecutionProvider"],
                                          session_module.SessionSettings(), cache)
    ok = session_module.create_session(path, ["CPUExecutionProvider"], session_module.SessionSettings(),
                                       str(tmp_path / "cache"))
    assert ok.run(None, {"x": np.array([-1, 2], np.float32)})[0].tolist() == [0, 2]


def test_no_benchmark_script_shadows_a_standard_library_module():
    # a script's folder comes first on sys.path: benchmarks/signal.py once replaced `signal` for
    # every module quality.py's subprocesses imported (torch's multiprocessing among them)
    folder = os.path.join(ROOT, "benchmarks")
    names = {name[:-3] for name in os.listdir(folder) if name.endswith(".py")}
    assert not names & set(sys.stdlib_module_names), names & set(sys.stdlib_module_names)
