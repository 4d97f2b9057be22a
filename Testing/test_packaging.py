"""Extension packaging: CMake lists every module file, index entry valid and consistent, icon, license.

Also the Slicer-side dependency handling (AbdomenKDSegLib.dependencies), which decides what the
module installs with pip inside Slicer.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import jsonschema
import pytest

from AbdomenKDSegLib import dependencies

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "AbdomenKDSeg"
SCHEMA = REPO.parent / "shared" / "slicer" / "slicer-extension-catalog-entry-schema-v1.0.2.json"
INDEX_ENTRY = REPO / "Resources" / "AbdomenKDSeg.json"


# ----------------------------------------------------------------------------- CMake parsing
def cmake_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(command name, arguments) of each command in a CMake file; comments removed, quotes kept off."""
    text = re.sub(r"#[^\n]*", "", path.read_text(encoding="utf-8"))
    commands = []
    for name, body in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(((?:[^()]|\([^()]*\))*)\)", text):
        args = [a[1:-1] if a.startswith('"') else a for a in re.findall(r'"[^"]*"|[^\s"]+', body)]
        commands.append((name.lower(), args))
    return commands


def cmake_variables(path: Path) -> dict[str, list[str]]:
    """Values of every ``set(NAME values...)`` with ``${VAR}`` references to earlier scalars expanded."""
    values: dict[str, list[str]] = {}
    for name, args in cmake_commands(path):
        if name == "set" and args:
            expanded = []
            for arg in args[1:]:
                for var, val in values.items():
                    if len(val) == 1:
                        arg = arg.replace("${" + var + "}", val[0])
                expanded.append(arg)
            values[args[0]] = expanded
    return values


def module_files_on_disk() -> tuple[set[str], set[str]]:
    """Python files (module + every AbdomenKDSegLib file, subpackages too) and resource files."""
    skip = {"__pycache__"}
    scripts = {"AbdomenKDSeg.py"} | {
        p.relative_to(MODULE).as_posix() for p in (MODULE / "AbdomenKDSegLib").rglob("*.py")
        if not skip & set(p.parts)}
    resources = {p.relative_to(MODULE).as_posix() for p in (MODULE / "Resources").rglob("*")
                 if p.is_file() and not skip & set(p.parts) and not p.name.endswith(".pyc")}
    return scripts, resources


@pytest.fixture(scope="module")
def module_cmake() -> dict[str, list[str]]:
    return cmake_variables(MODULE / "CMakeLists.txt")


@pytest.fixture(scope="module")
def top_cmake() -> dict[str, list[str]]:
    return cmake_variables(REPO / "CMakeLists.txt")


def test_module_cmake_lists_every_python_file(module_cmake):
    scripts, _ = module_files_on_disk()
    listed = set(module_cmake["MODULE_PYTHON_SCRIPTS"])
    missing = sorted(scripts - listed)
    assert not missing, "add to MODULE_PYTHON_SCRIPTS in AbdomenKDSeg/CMakeLists.txt:\n  " + "\n  ".join(missing)
    assert {"AbdomenKDSeg.py", "AbdomenKDSegLib/__init__.py", "AbdomenKDSegLib/slicer/logic.py",
            "AbdomenKDSegLib/slicer/worker.py", "AbdomenKDSegLib/training/__init__.py"} <= listed


def test_module_cmake_lists_every_resource(module_cmake):
    _, resources = module_files_on_disk()
    listed = set(module_cmake["MODULE_PYTHON_RESOURCES"])
    missing = sorted(resources - listed)
    assert not missing, "add to MODULE_PYTHON_RESOURCES in AbdomenKDSeg/CMakeLists.txt:\n  " + "\n  ".join(missing)
    from AbdomenKDSegLib.engine.bundle import DEFAULT_BUNDLE_NAME

    assert {"Resources/UI/AbdomenKDSeg.ui", "Resources/Icons/AbdomenKDSeg.png", "Resources/requirements.txt",
            "Resources/requirements-optional.txt", f"Resources/Models/{DEFAULT_BUNDLE_NAME}",
            "Resources/Testing/ct-abdomen-6mm.nrrd"} <= listed


def test_every_listed_module_file_exists(module_cmake):
    listed = module_cmake["MODULE_PYTHON_SCRIPTS"] + module_cmake["MODULE_PYTHON_RESOURCES"]
    absent = [f for f in listed if not (MODULE / f).is_file()]
    assert not absent, f"listed in AbdomenKDSeg/CMakeLists.txt but not on disk: {absent}"
    assert len(listed) == len(set(listed)), "a file is listed twice"


def test_module_cmake_builds_a_scripted_module(module_cmake):
    commands = dict(cmake_commands(MODULE / "CMakeLists.txt"))
    build = commands["slicermacrobuildscriptedmodule"]
    for keyword, value in (("NAME", "${MODULE_NAME}"), ("SCRIPTS", "${MODULE_PYTHON_SCRIPTS}"),
                           ("RESOURCES", "${MODULE_PYTHON_RESOURCES}")):
        assert build[build.index(keyword) + 1] == value
    assert module_cmake["MODULE_NAME"] == ["AbdomenKDSeg"]


def test_top_level_cmake_declares_the_extension(top_cmake):
    names = [name for name, _ in cmake_commands(REPO / "CMakeLists.txt")]
    args = {name: a for name, a in cmake_commands(REPO / "CMakeLists.txt")}
    assert names[0] == "cmake_minimum_required"
    assert args["project"] == ["AbdomenKDSeg"]
    assert args["find_package"] == ["Slicer", "REQUIRED"]
    assert args["add_subdirectory"] == ["AbdomenKDSeg"]
    includes = [a[0] for n, a in cmake_commands(REPO / "CMakeLists.txt") if n == "include"]
    assert includes == ["${Slicer_USE_FILE}", "${Slicer_EXTENSION_GENERATE_CONFIG}", "${Slicer_EXTENSION_CPACK}"]
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert top_cmake.get(key) and all(top_cmake[key]), f"{key} missing or empty"
    assert top_cmake["EXTENSION_CATEGORY"] == ["Segmentation"]
    assert top_cmake["EXTENSION_DEPENDS"] == ["PyTorch"]


def _repo_file_of_url(url: str) -> Path:
    """Local file behind a raw.githubusercontent.com URL of this repository's main branch."""
    match = re.match(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/main/(.+)$", url)
    assert match, f"not a raw GitHub URL of the main branch: {url}"
    return REPO / match.group(1)


def test_icon_and_screenshot_urls_point_to_files_in_the_repository(top_cmake):
    icon = _repo_file_of_url(top_cmake["EXTENSION_ICONURL"][0])
    assert icon == REPO / "AbdomenKDSeg.png"
    for url in " ".join(top_cmake["EXTENSION_SCREENSHOTURLS"]).split():
        path = _repo_file_of_url(url)
        assert path.suffix.lower() in (".png", ".jpg") and path.is_file(), f"screenshot missing: {path}"
    homepage = top_cmake["EXTENSION_HOMEPAGE"][0]
    assert homepage.startswith("https://github.com/") and top_cmake["EXTENSION_ICONURL"][0].startswith(
        homepage.replace("https://github.com/", "https://raw.githubusercontent.com/"))


def test_index_metadata_is_honest_about_the_model_and_shows_the_module_result(top_cmake):
    contributors = " ".join(top_cmake["EXTENSION_CONTRIBUTORS"])
    assert contributors == "AbdomenKDSeg team (Independent)"  # Slicer convention "Name (Organization)"
    description = " ".join(top_cmake["EXTENSION_DESCRIPTION"])
    assert "demonstration model" in description and "single real labeled CT" in description
    assert "accuracy measured on unseen CT is stated in the README" in description and "DSC" not in description
    screenshots = " ".join(top_cmake["EXTENSION_SCREENSHOTURLS"]).split()
    assert [_repo_file_of_url(u).name for u in screenshots] == ["organs-3d-module-result.png"]
    assert "reference-labels" not in (REPO / "README.md").read_text(encoding="utf-8")
    assert "organs-3d-module-result.png" in (REPO / "README.md").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- index entry
def test_index_entry_validates_against_the_schema():
    entry = json.loads(INDEX_ENTRY.read_text(encoding="utf-8"))
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(entry, schema, cls=jsonschema.Draft7Validator)
    for key in ("$schema", "category", "scm_url", "scm_revision", "build_dependencies"):
        assert entry.get(key), f"{key} missing"
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")


def test_index_entry_matches_the_cmake_metadata(top_cmake):
    entry = json.loads(INDEX_ENTRY.read_text(encoding="utf-8"))
    project = dict(cmake_commands(REPO / "CMakeLists.txt"))["project"][0]
    assert INDEX_ENTRY.stem == project  # the index requires file name == project name
    assert entry["build_dependencies"] == top_cmake["EXTENSION_DEPENDS"]
    assert entry["category"] == top_cmake["EXTENSION_CATEGORY"][0]
    repo_name = entry["scm_url"].rstrip("/").split("/")[-1]
    assert repo_name.startswith("Slicer") and not project.startswith("Slicer")
    assert entry["scm_url"] == top_cmake["EXTENSION_HOMEPAGE"][0]


# ----------------------------------------------------------------------------- icon, license
def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("path", [REPO / "AbdomenKDSeg.png", MODULE / "Resources" / "Icons" / "AbdomenKDSeg.png"])
def test_icon_is_a_128_pixel_png(path):
    assert png_size(path) == (128, 128)


def test_license_is_apache_2():
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text and len(text) > 10000


# ----------------------------------------------------------------------------- dependencies
def requirement_names(path: Path) -> set[str]:
    raw = path.read_text(encoding="utf-8")
    return {dependencies.canonical_name(dependencies.requirement_name(line))
            for line in raw.splitlines() if line.strip() and not line.lstrip().startswith("#")}


def test_requirements_files_never_list_slicer_packages_or_torch():
    required = requirement_names(MODULE / "Resources" / dependencies.REQUIRED_FILE)
    optional = requirement_names(MODULE / "Resources" / dependencies.OPTIONAL_FILE)
    assert required == {"connected-components-3d", "fastremap", "safetensors"}
    assert optional == {"onnxruntime", "openvino"}  # separate step: their failure only costs speed
    protected = {dependencies.canonical_name(p) for p in dependencies.PROTECTED}
    assert not (required | optional) & protected


def test_requirements_cover_what_the_worker_imports():
    # These are installed here (the test environment mirrors a finished installation): nothing is missing.
    for name in (dependencies.REQUIRED_FILE, dependencies.OPTIONAL_FILE):
        requirements = dependencies.read_requirements(MODULE / "Resources" / name)
        assert dependencies.missing_requirements(requirements) == []


def test_protected_packages_are_filtered_and_versions_checked(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("# comment\nnumpy>=1\nSimpleITK\ntorch>=2\nvtk\n-r other.txt\n"
                   "fastremap>=0.1  # installed\nfastremap-not-a-real-package>=1.0\n", encoding="utf-8")
    assert dependencies.read_requirements(req) == ["fastremap>=0.1", "fastremap-not-a-real-package>=1.0"]
    assert dependencies.is_satisfied("fastremap>=0.1")
    assert not dependencies.is_satisfied("fastremap>=999")
    assert not dependencies.is_satisfied("fastremap-not-a-real-package>=1.0")


def test_ensure_requirements_asks_once_and_pins_slicer_packages(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("fastremap>=0.1\nnot-installed-abdomenkdseg-test-package>=1.0\n", encoding="utf-8")
    constraints = tmp_path / "constraints.txt"
    asked, installed = [], []

    def confirm(message):
        asked.append(message)
        return True

    with pytest.raises(dependencies.DependencyError, match="installing these Python packages failed"):
        dependencies.ensure_requirements(req, confirm, installed.append, constraints, log=lambda t: None)
    assert len(asked) == 1 and "not-installed-abdomenkdseg-test-package>=1.0" in asked[0]
    assert "fastremap" not in asked[0]
    assert installed == [["-c", str(constraints), "not-installed-abdomenkdseg-test-package>=1.0"]]
    import numpy
    import SimpleITK

    pins = constraints.read_text(encoding="utf-8").split()
    assert f"numpy=={numpy.__version__}" in pins
    assert any(p.lower().startswith("simpleitk==") for p in pins) and SimpleITK.Version() is not None


def test_ensure_requirements_declined_installs_nothing(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text("not-installed-abdomenkdseg-test-package\n", encoding="utf-8")
    installed = []
    with pytest.raises(dependencies.DependencyError, match="needs these Python packages"):
        dependencies.ensure_requirements(req, lambda m: False, installed.append, tmp_path / "c.txt", log=print)
    assert installed == []
    satisfied = tmp_path / "ok.txt"
    satisfied.write_text("safetensors\n", encoding="utf-8")
    assert dependencies.ensure_requirements(satisfied, lambda m: 1 / 0, installed.append, tmp_path / "c.txt") == []
