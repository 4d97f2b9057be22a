"""Python packages the worker needs inside Slicer: what is missing, and installing it safely.

Pure Python (no ``slicer`` import): the Slicer module passes its own ``confirm`` and ``install``
functions (``slicer.util.confirmOkCancelDisplay`` and ``slicer.util.pip_install``), so the logic
here is testable anywhere. Packages that Slicer ships itself (numpy, SimpleITK, vtk) and torch
(installed by the PyTorch extension) are never installed from here, and a pip constraints file
pins the installed versions of the former so that no dependency can replace them.

Installing is done in steps (:func:`ensure_packages`): the required packages (``requirements.txt``;
their failure stops the segmentation), then the CPU runtimes OpenVINO and ONNX Runtime
(``requirements-optional.txt``), each in its own pip call (one is enough: the CPU segmentation runs
with either, without PyTorch), then torch through the PyTorch extension (the caller's
``ensure_torch``) **only for GPU use** or when neither runtime could be installed.
:func:`package_status` lists what is installed.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

#: Distributions that must never be installed or replaced by this module.
PROTECTED = ("numpy", "SimpleITK", "vtk", "torch")
#: Distributions whose installed version is pinned while installing requirements.
PINNED = ("numpy", "SimpleITK", "vtk")
#: Minimum torch version the engine needs.
TORCH_REQUIREMENT = ">=2.1"  # load_state_dict(assign=True) of bundle.py
#: Resource files (in the module's ``Resources`` folder) of the required and the optional packages.
REQUIRED_FILE = "requirements.txt"
OPTIONAL_FILE = "requirements-optional.txt"
#: What each optional package is for, shown in the panel.
OPTIONAL_PURPOSE = "CPU runtime: one of the two is needed"
#: What torch is for, shown in the panel.
TORCH_PURPOSE = "PyTorch extension: only for GPU use"

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


class DependencyError(RuntimeError):
    """A required package is missing and was not installed (declined or failed)."""


def canonical_name(name: str) -> str:
    """PEP 503 normalised distribution name (``Connected_Components.3D`` -> ``connected-components-3d``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    """Distribution name of a requirement line (``"fastremap>=1.14"`` -> ``"fastremap"``)."""
    match = _NAME.match(requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return match.group(1)


def read_requirements(path: str | Path) -> list[str]:
    """Requirement lines of a requirements file, without comments, options and protected packages."""
    protected = {canonical_name(p) for p in PROTECTED}
    out = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        if canonical_name(requirement_name(line)) in protected:
            continue
        out.append(line)
    return out


def installed_version(name: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def is_satisfied(requirement: str) -> bool:
    """True if the requirement's distribution is installed in a version the specifier allows.

    Without the ``packaging`` library only presence is checked.
    """
    version = installed_version(requirement_name(requirement))
    if version is None:
        return False
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return True
    req = Requirement(requirement)
    if req.marker is not None and not req.marker.evaluate():
        return True
    return req.specifier.contains(version, prereleases=True)


def missing_requirements(requirements: Iterable[str]) -> list[str]:
    """The requirements that are not satisfied."""
    return [r for r in requirements if not is_satisfied(r)]


def constraints_text(names: Sequence[str] = PINNED) -> str:
    """pip constraints pinning the installed versions of ``names`` (absent ones are skipped)."""
    lines = []
    for name in names:
        version = installed_version(name)
        if version is not None:
            lines.append(f"{name}=={version}")
    return "\n".join(lines) + ("\n" if lines else "")


def torch_available() -> bool:
    """True if ``import torch`` can be found (without importing it)."""
    return importlib.util.find_spec("torch") is not None


def ensure_requirements(
    requirements_file: str | Path,
    confirm: Callable[[str], bool],
    install: Callable[[list[str]], object],
    constraints_file: str | Path,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Install the missing requirements of ``requirements_file`` after one confirmation.

    ``confirm(message)`` asks the user; ``install(args)`` runs ``pip install`` with the given
    arguments (``-c <constraints> req1 req2 ...``). Returns the requirements installed (empty if
    none were missing). Raises DependencyError if the user declines.
    """
    missing = missing_requirements(read_requirements(requirements_file))
    if not missing:
        return []
    message = ("AbdomenKDSeg needs these Python packages, which are not installed yet:\n\n"
               + "\n".join(f"  - {r}" for r in missing)
               + "\n\nInstall them now? (This needs internet access; Slicer's own numpy, "
               "SimpleITK and VTK are left unchanged.)")
    if not confirm(message):
        raise DependencyError("the segmentation needs these Python packages: " + ", ".join(missing))
    Path(constraints_file).write_text(constraints_text(), encoding="utf-8")
    log(f"Installing {', '.join(missing)} ...")
    install(["-c", str(constraints_file), *missing])
    still = missing_requirements(missing)
    if still:
        raise DependencyError("installing these Python packages failed: " + ", ".join(still))
    log("Python packages installed.")
    return missing


# ----------------------------------------------------------------------------- status and steps
@dataclass
class PackageStatus:
    """One package the module uses: name, installed version (None: not installed), role."""

    name: str
    requirement: str
    version: str | None
    required: bool
    satisfied: bool

    def text(self) -> str:
        """``"fastremap 1.15.0"``, ``"openvino: not installed (CPU runtime: one of the two is needed)"``."""
        purpose = TORCH_PURPOSE if self.name == "torch" else OPTIONAL_PURPOSE
        role = "" if self.required else f" ({purpose})"
        if self.version is None:
            return f"{self.name}: not installed{role}"
        if not self.satisfied:
            return f"{self.name} {self.version}: too old, {self.requirement} needed{role}"
        return f"{self.name} {self.version}{role}"


def package_status(required_file: str | Path, optional_file: str | Path | None = None) -> list[PackageStatus]:
    """The required packages, the CPU runtimes, then torch (GPU use only), each with its installed version."""
    rows = []
    entries = [(r, True) for r in read_requirements(required_file)]
    if optional_file is not None and Path(optional_file).is_file():
        entries += [(r, False) for r in read_requirements(optional_file)]
    entries.append((f"torch{TORCH_REQUIREMENT}", False))
    for requirement, required in entries:
        name = requirement_name(requirement)
        rows.append(PackageStatus(name, requirement, installed_version(name), required, is_satisfied(requirement)))
    return rows


def cuda_driver_present() -> bool:
    """True when the NVIDIA driver library loads (cheap; tells whether CUDA, and so PyTorch, can be of use)."""
    names = {"win32": ("nvcuda.dll",), "linux": ("libcuda.so.1", "libcuda.so")}.get(sys.platform, ())
    for name in names:
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return True
    return False


def cpu_runtime_available(optional_file: str | Path | None) -> bool:
    """True when one of the CPU runtimes of ``optional_file`` is installed (a CPU run needs no torch)."""
    if optional_file is None or not Path(optional_file).is_file():
        return False
    return any(is_satisfied(r) for r in read_requirements(optional_file))


@dataclass
class InstallReport:
    """What :func:`ensure_packages` did."""

    required: list[str] = field(default_factory=list)
    optional: list[str] = field(default_factory=list)
    #: one message per CPU runtime that could not be installed
    warnings: list[str] = field(default_factory=list)


def _pip_install(install: Callable[[list[str]], object], constraints_file: str | Path,
                 requirements: Sequence[str], reinstall: bool) -> None:
    """Install ``requirements``; with ``reinstall`` the installed ones are reinstalled (not their deps)."""
    present = [r for r in requirements if installed_version(requirement_name(r)) is not None]
    absent = [r for r in requirements if r not in present]
    if absent or not reinstall:
        todo = absent if reinstall else list(requirements)
        if todo:
            install(["-c", str(constraints_file), *todo])
    if reinstall and present:
        # --no-deps: reinstalling a dependency would replace Slicer's own numpy and friends
        install(["--force-reinstall", "--no-deps", "-c", str(constraints_file), *present])


def ensure_packages(
    required_file: str | Path,
    optional_file: str | Path | None,
    confirm: Callable[[str], bool],
    install: Callable[[list[str]], object],
    constraints_file: str | Path,
    log: Callable[[str], None] = print,
    ensure_torch: Callable[[], object] | None = None,
    optional: Optional[bool] = None,
    reinstall: bool = False,
    gpu: bool = False,
) -> InstallReport:
    """Install what the segmentation needs, in steps: the required packages, the CPU runtimes, torch
    only where needed.

    1. the missing required packages of ``required_file``, after one confirmation that also names
       the CPU runtimes about to be installed; declining or a failure raises DependencyError;
    2. the CPU runtimes of ``optional_file`` (``optional``: True always, False never, None when
       step 1 installed something, i.e. on first use, or when none is installed), one pip call
       each; a failure is a warning in the returned report (logged), never an error;
    3. ``ensure_torch()`` (the PyTorch extension; it raises DependencyError when torch stays
       missing) only with ``gpu`` (a CUDA run) or when no CPU runtime is installed after step 2.

    ``reinstall``: reinstall every package of steps 2 and 3 (``--force-reinstall --no-deps``; the
    missing ones are installed normally). Slicer's numpy, SimpleITK and VTK are pinned to their
    installed versions by a constraints file in every pip call.
    """
    def finish(report: InstallReport) -> InstallReport:  # step 3
        if ensure_torch is not None and (gpu or not cpu_runtime_available(optional_file)):
            ensure_torch()
        return report

    report = InstallReport()
    required = read_requirements(required_file)
    optional_all = read_requirements(optional_file) if optional_file is not None and Path(optional_file).is_file() \
        else []
    todo = list(required) if reinstall else missing_requirements(required)
    try_optional = (optional is True or (optional is None and (bool(todo) or not cpu_runtime_available(optional_file)))
                    or (reinstall and optional is not False))
    optional_todo = (list(optional_all) if reinstall else missing_requirements(optional_all)) if try_optional else []
    if not todo and not optional_todo:
        return finish(report)
    verb = "Reinstall" if reinstall else "Install"
    lines = []
    if todo:
        lines.append(f"AbdomenKDSeg needs these Python packages{'' if reinstall else ', which are not installed yet'}:")
        lines += [f"  - {r}" for r in todo]
    if optional_todo:
        lines.append("CPU runtimes, one of which the segmentation on the CPU needs (about 100 MB; if neither "
                     "can be installed, PyTorch is installed instead; PyTorch is otherwise needed only for GPU use):")
        lines += [f"  - {r}" for r in optional_todo]
    message = ("\n".join(lines) + f"\n\n{verb} them now? (This needs internet access; Slicer's own numpy, "
               "SimpleITK and VTK are left unchanged.)")
    if not confirm(message):
        if todo:
            raise DependencyError("the segmentation needs these Python packages: " + ", ".join(todo))
        return finish(report)
    Path(constraints_file).write_text(constraints_text(), encoding="utf-8")
    if todo:
        log(f"{verb}ing the required packages {', '.join(todo)} ...")
        try:
            _pip_install(install, constraints_file, todo, reinstall)
        except Exception as exc:
            raise DependencyError(f"installing these Python packages failed: {', '.join(todo)} ({exc})") from exc
        still = missing_requirements(todo)
        if still:
            raise DependencyError("installing these Python packages failed: " + ", ".join(still))
        report.required = todo
        log("Required Python packages installed.")
    for requirement in optional_todo:
        log(f"{verb}ing the optional package {requirement} ...")
        problem = None
        try:
            _pip_install(install, constraints_file, [requirement], reinstall)
        except Exception as exc:  # pip's failure: only speed is lost
            problem = str(exc) or type(exc).__name__
        if problem is None and not is_satisfied(requirement):
            problem = "pip finished but the package is not installed"
        if problem is None:
            report.optional.append(requirement)
            continue
        text = (f"the CPU runtime {requirement_name(requirement)} could not be installed ({problem}); "
                "the segmentation uses the other runtime, or PyTorch (slower) if neither is installed")
        report.warnings.append(text)
        log(f"Warning: {text}")
    return finish(report)
