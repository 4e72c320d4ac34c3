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
# the onnxruntime builds: each installs the same `onnxruntime` package folder, so two of them in one
# Python leave whichever installed last (microsoft/onnxruntime#26996)
ORT_BUILDS = {"onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
              "onnxruntime-rocm", "onnxruntime-qnn", "onnxruntime-silicon", "onnxruntime-training"}


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


def test_every_install_asks_for_exactly_one_onnxruntime_build(metadata):
    extras = metadata.get_all("Provides-Extra")
    assert set(extras) >= {"export", "ray", "test"}
    for chosen in [()] + [(e,) for e in extras] + [tuple(extras)]:
        builds = set(_pulled(metadata, chosen)) & ORT_BUILDS
        # the CPU build, which `pip install -e .` needs on a CPU; a GPU build is a documented swap
        assert builds == {"onnxruntime"}, (chosen, builds)


def test_the_readme_documents_the_gpu_swap():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().replace("\n", " ")
    assert "pip install -e . && pip uninstall -y onnxruntime && pip install onnxruntime-gpu" in readme


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
    for name, reqs in everything.items():
        for req in reqs:
            assert all(s.operator not in ("==", "===") for s in req.specifier), f"{req}: exact pins go in .ci/constraints.txt"
            assert name in pins, f"{name} has no CI pin"
            assert req.specifier.contains(pins[name], prereleases=True), f"CI's {name}=={pins[name]} is outside {req}"
    assert "torch" in pins and pins["torch"] == Version("2.13.0")


def test_diffusers_floor_is_the_version_the_samplers_copy(metadata):
    (diffusers,) = _pulled(metadata, ["export"])["diffusers"]
    # edge_ti/schedulers copy diffusers 0.39's scheduler defaults; the parity tests compare against it
    assert diffusers.specifier.contains("0.39.0") and not diffusers.specifier.contains("0.38.9")
