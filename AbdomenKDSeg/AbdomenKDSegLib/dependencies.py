"""Python packages the worker needs inside Slicer: what is missing, and installing it safely.

Pure Python (no ``slicer`` import): the Slicer module passes its own ``confirm`` and ``install``
functions (``slicer.util.confirmOkCancelDisplay`` and ``slicer.util.pip_install``), so the logic
here is testable anywhere. Packages that Slicer ships itself (numpy, SimpleITK, vtk) and torch
(installed by the PyTorch extension) are never installed from here, and a pip constraints file
pins the installed versions of the former so that no dependency can replace them.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

#: Distributions that must never be installed or replaced by this module.
PROTECTED = ("numpy", "SimpleITK", "vtk", "torch")
#: Distributions whose installed version is pinned while installing requirements.
PINNED = ("numpy", "SimpleITK", "vtk")
#: Minimum torch version the engine needs.
TORCH_REQUIREMENT = ">=2.1"  # load_state_dict(assign=True) of bundle.py

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
