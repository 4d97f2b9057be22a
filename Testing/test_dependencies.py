"""First-use install in steps (required, CPU runtimes, torch only for GPU use) and the Slicer panel's package list.

``importlib.metadata.version`` is replaced by a fake "installed packages" table and the pip call by
a recorder that "installs" into that table (or fails), so nothing is installed for real. The
requirement files are the module's own.
"""

from __future__ import annotations

import importlib.metadata
import subprocess

import pytest

from AbdomenKDSegLib import dependencies

from engine_helpers import REPO

RESOURCES = REPO / "AbdomenKDSeg" / "Resources"
REQUIRED = RESOURCES / dependencies.REQUIRED_FILE
OPTIONAL = RESOURCES / dependencies.OPTIONAL_FILE
SLICER_PACKAGES = {"numpy": "1.26.4", "SimpleITK": "2.3.1", "vtk": "9.2.20230607"}


class FakePython:
    """Installed distributions (name -> version) and a pip that installs into them."""

    def __init__(self, installed: dict[str, str], failing: set[str] = frozenset()) -> None:
        self.installed = dict(installed)
        self.failing = set(failing)
        self.calls: list[list[str]] = []
        self.steps: list[str] = []

    def version(self, name: str) -> str:
        for key, value in self.installed.items():
            if dependencies.canonical_name(key) == dependencies.canonical_name(name):
                return value
        raise importlib.metadata.PackageNotFoundError(name)

    def pip(self, args: list[str]) -> None:
        self.calls.append(list(args))
        names = []
        skip = False
        for arg in args:
            if skip:
                skip = False
            elif arg == "-c":
                skip = True
            elif not arg.startswith("-"):
                names.append(dependencies.requirement_name(arg))
        self.steps.append("pip " + " ".join(names))
        for name in names:
            if name in self.failing:
                raise subprocess.CalledProcessError(1, ["pip", "install", name])
            self.installed[name] = "9999.0"

    def ensure_torch(self) -> None:
        self.steps.append("torch")
        self.installed.setdefault("torch", "2.4.0")


@pytest.fixture()
def fake(monkeypatch):
    python = FakePython(SLICER_PACKAGES)
    monkeypatch.setattr(importlib.metadata, "version", python.version)
    return python


def run(fake: FakePython, tmp_path, confirm=lambda message: True, **kwargs) -> dependencies.InstallReport:
    logs = []
    report = dependencies.ensure_packages(REQUIRED, OPTIONAL, confirm, fake.pip, tmp_path / "constraints.txt",
                                          log=logs.append, ensure_torch=fake.ensure_torch, **kwargs)
    report.logs = logs
    return report


def test_package_list_shows_versions_and_what_is_missing(fake):
    fake.installed.update({"torch": "2.4.1", "fastremap": "1.15.0", "connected-components-3d": "3.18.0",
                           "openvino": "2024.4.0"})
    rows = dependencies.package_status(REQUIRED, OPTIONAL)
    assert [r.name for r in rows] == ["connected-components-3d", "fastremap", "safetensors",
                                      "onnxruntime", "openvino", "torch"]
    assert [r.text() for r in rows] == [
        "connected-components-3d 3.18.0", "fastremap 1.15.0", "safetensors: not installed",
        "onnxruntime: not installed (CPU runtime: one of the two is needed)",
        "openvino 2024.4.0 (CPU runtime: one of the two is needed)",
        "torch 2.4.1 (PyTorch extension: only for GPU use)"]
    assert [r.required for r in rows] == [True, True, True, False, False, False]
    fake.installed["fastremap"] = "1.0"
    assert dependencies.package_status(REQUIRED)[1].text() == "fastremap 1.0: too old, fastremap>=1.14 needed"


def test_first_use_installs_required_then_each_cpu_runtime_and_no_torch(fake, tmp_path):
    asked = []
    report = run(fake, tmp_path, confirm=lambda m: asked.append(m) or True)
    assert fake.steps == ["pip connected-components-3d fastremap safetensors", "pip onnxruntime",
                          "pip openvino"]  # a CPU runtime installed: PyTorch is not needed
    assert len(asked) == 1  # one question names both the required packages and the CPU runtimes
    assert "safetensors>=0.4" in asked[0] and "openvino>=2024.3" in asked[0] and "CPU runtimes" in asked[0]
    assert "only for GPU use" in asked[0]
    constraints = str(tmp_path / "constraints.txt")
    assert all(call[:2] == ["-c", constraints] for call in fake.calls)
    pins = (tmp_path / "constraints.txt").read_text().split()
    assert pins == ["numpy==1.26.4", "SimpleITK==2.3.1", "vtk==9.2.20230607"]
    assert report.required == ["connected-components-3d>=3.12", "fastremap>=1.14", "safetensors>=0.4"]
    assert report.optional == ["onnxruntime>=1.16", "openvino>=2024.3"] and report.warnings == []
    assert run(fake, tmp_path).required == [] and fake.calls[-1][-1] == "openvino>=2024.3"  # nothing more
    run(fake, tmp_path, gpu=True)  # a CUDA run: PyTorch through the extension, nothing else
    assert fake.steps[-1] == "torch" and fake.calls[-1][-1] == "openvino>=2024.3"


def test_torch_is_installed_when_no_cpu_runtime_can_be(fake, tmp_path):
    fake.failing = {"openvino", "onnxruntime"}
    report = run(fake, tmp_path)
    assert fake.steps == ["pip connected-components-3d fastremap safetensors", "pip onnxruntime", "pip openvino",
                          "torch"]
    assert len(report.warnings) == 2 and "PyTorch" in report.warnings[0]


def test_optional_failure_is_only_a_warning(fake, tmp_path):
    fake.failing = {"openvino"}
    report = run(fake, tmp_path)
    assert report.required and report.optional == ["onnxruntime>=1.16"]
    assert len(report.warnings) == 1
    assert "openvino could not be installed" in report.warnings[0] and "other runtime" in report.warnings[0]
    assert any(line.startswith("Warning: the CPU runtime openvino") for line in report.logs)
    assert "torch" not in fake.steps  # ONNX Runtime runs the CPU segmentation
    assert "safetensors" in fake.installed  # the required step was done before


def test_required_failure_stops_before_the_optional_step(fake, tmp_path):
    fake.failing = {"fastremap"}
    with pytest.raises(dependencies.DependencyError, match="installing these Python packages failed"):
        run(fake, tmp_path)
    assert fake.steps == ["pip connected-components-3d fastremap safetensors"]


def test_declining_installs_nothing_and_torch_only_for_gpu(fake, tmp_path):
    with pytest.raises(dependencies.DependencyError, match="needs these Python packages"):
        run(fake, tmp_path, confirm=lambda m: False)
    assert fake.steps == [] and fake.calls == []

    def no_torch():
        raise dependencies.DependencyError("PyTorch extension missing")

    fake.installed.update({"connected-components-3d": "3.18", "fastremap": "1.15", "safetensors": "0.4.5",
                           "openvino": "2024.4"})
    dependencies.ensure_packages(REQUIRED, OPTIONAL, lambda m: 1 / 0, fake.pip, tmp_path / "c.txt",
                                 ensure_torch=no_torch)  # CPU: no PyTorch asked for
    with pytest.raises(dependencies.DependencyError, match="PyTorch extension missing"):
        dependencies.ensure_packages(REQUIRED, OPTIONAL, lambda m: 1 / 0, fake.pip, tmp_path / "c.txt",
                                     ensure_torch=no_torch, gpu=True)
    assert fake.calls == []


def test_later_runs_do_not_retry_missing_optional_packages_unless_asked(fake, tmp_path):
    fake.installed.update({"torch": "2.4.0", "connected-components-3d": "3.18", "fastremap": "1.15",
                           "safetensors": "0.4.5", "openvino": "2024.4"})
    assert run(fake, tmp_path, confirm=lambda m: 1 / 0).optional == []  # Segment: no question, no pip
    assert fake.calls == []
    report = run(fake, tmp_path, optional=True)  # the "Install missing" button: the missing runtime
    assert report.optional == ["onnxruntime>=1.16"] and fake.steps[-1:] == ["pip onnxruntime"]
    del fake.installed["openvino"], fake.installed["onnxruntime"]
    assert run(fake, tmp_path).optional == ["onnxruntime>=1.16", "openvino>=2024.3"]  # none: retried


def test_reinstall_forces_the_packages_but_never_their_dependencies(fake, tmp_path):
    fake.installed.update({"torch": "2.4.0", "connected-components-3d": "3.18", "fastremap": "1.15",
                           "safetensors": "0.4.5", "openvino": "2024.4"})
    asked = []
    report = run(fake, tmp_path, confirm=lambda m: asked.append(m) or True, optional=True, reinstall=True)
    assert asked and asked[0].endswith("Reinstall them now? (This needs internet access; Slicer's own numpy, "
                                       "SimpleITK and VTK are left unchanged.)")
    constraints = str(tmp_path / "constraints.txt")
    assert fake.calls == [
        ["--force-reinstall", "--no-deps", "-c", constraints, "connected-components-3d>=3.12", "fastremap>=1.14",
         "safetensors>=0.4"],
        ["-c", constraints, "onnxruntime>=1.16"],  # not installed before: installed with its dependencies
        ["--force-reinstall", "--no-deps", "-c", constraints, "openvino>=2024.3"],
    ]
    assert report.warnings == []
