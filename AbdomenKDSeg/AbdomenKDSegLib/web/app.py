"""The trame-slicer web app of ``abdomen-kdseg serve``: the Slicer module in a browser page.

- Slicer's own MRML scene and views (trame-slicer): three slice views with the organs as overlays
  and a 3D view with their surfaces ("Quad View"), window/level presets;
- loading: an upload (NIfTI, NRRD, MHA, or a ``.zip`` of a DICOM series), a file of ``--data``, or
  the bundled sample CT; every file is read and checked by the engine's reader (:func:`read_image`),
  so a bad file gives the CLI's message in the page and the app goes on serving;
- **Segment abdomen** runs :class:`~AbdomenKDSegLib.slicer.logic.AbdomenKDSegLogic`, the Slicer
  panel's logic, with its persistent worker process (the same worker as the Slicer module); live
  progress from its events, Cancel kills the worker's process tree;
- after a run: the organ table of :mod:`~AbdomenKDSegLib.engine.organ_statistics` (name, color, mL,
  the FLARE22 range scaled by the field of view, a flag), show/hide toggles, and downloads of the
  label map (``.nii.gz``, FLARE22 values) and of the segmentation (``.seg.nrrd`` with terminology).

One server has one scene, shared by every browser tab connected to it: while a file loads or a
segmentation runs, every tab shows a busy banner and refuses other actions (never a mixed result).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine.model_card import describe_model
from ..engine.organ_statistics import OrganRow
from ..engine.organs import BY_KEY, ORGANS
from ..errors import AbdomenKDSegError, InputError, UsageError
from ..request import DEVICE_NAMES, DEVICES
from ..resources import LIBRARY_PARENT

LOG = logging.getLogger("AbdomenKDSeg.web")
#: The sample CT shipped in the repository.
SAMPLE_CT = LIBRARY_PARENT.parent / "Resources" / "Sample" / "ct-abdomen-3mm.nii.gz"
#: Window/level presets (window, level) in HU.
PRESETS: dict[str, tuple[float, float]] = {"abdomen": (350.0, 40.0), "liver": (150.0, 60.0), "bone": (1000.0, 400.0)}
#: File types the upload takes.
UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".zip")
#: Layout of the views (trame-slicer's name for Slicer's four-up layout).
LAYOUT = "Quad View"


@dataclass
class ServeOptions:
    """What ``abdomen-kdseg serve`` was started with."""

    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path | None = None
    max_upload_mb: float = 1024.0
    model: str | None = None
    threads: int = 0
    #: test hook: the worker waits this long before each run (to test Cancel)
    worker_debug_delay: float = 0.0


def upload_name_ok(name: str) -> bool:
    """True for the file types the upload takes (:data:`UPLOAD_SUFFIXES`)."""
    return name.lower().endswith(UPLOAD_SUFFIXES)


def case_name(name: str) -> str:
    """A file's name without its image suffix (the volume's name in the scene)."""
    lower = name.lower()
    for suffix in UPLOAD_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)] or "volume"
    return name or "volume"


def data_choices(folder: Path | None) -> list[str]:
    """The CTs of ``--data``: image files and DICOM series folders, as names inside the folder."""
    if folder is None or not folder.is_dir():
        return []
    from ..cli import find_cases

    return [p.name for p in find_cases(folder)]


def extract_dicom_zip(path: Path, into: Path, max_bytes: int) -> Path:
    """Unpack a zip of a DICOM series; returns the folder holding the largest series.

    InputError for a file that is not a zip, one that would unpack to more than ``max_bytes``,
    or one without a readable DICOM series.
    """
    from ..engine.image_io import dicom_series_files

    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            if sum(m.file_size for m in members) > max_bytes:
                raise InputError(f"{path.name} would unpack to more than {max_bytes / 1e6:.0f} MB")
            archive.extractall(into)  # zipfile drops absolute paths and '..'
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise InputError(f"{path.name} is not a readable zip file ({exc})") from None
    best: tuple[int, Path | None] = (0, None)
    for folder in [into, *sorted(p for p in into.rglob("*") if p.is_dir())]:
        count = len(dicom_series_files(folder))
        if count > best[0]:
            best = (count, folder)
    if best[1] is None:
        raise InputError(f"{path.name} holds no readable DICOM series (is it a zip of a CT's DICOM files?)")
    return best[1]


def read_ct(path: Path) -> tuple[Any, list[str]]:
    """The engine's checked read of a CT file or DICOM folder: (SimpleITK image, warnings)."""
    from ..engine.image_io import read_image

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = read_image(path)
    texts: list[str] = []
    for w in caught:
        text = str(w.message).replace(str(path), path.name)
        if text not in texts:
            texts.append(text)
    return image, texts


def row_state(row: OrganRow, visible: bool = True) -> dict[str, Any]:
    """An organ table row as the page's state (JSON)."""
    r, g, b = row.organ.color
    return {"key": row.organ.key, "name": row.organ.name, "color": f"#{r:02x}{g:02x}{b:02x}",
            "volume": row.volume_text, "range": row.range_text, "status": row.status,
            "flag": row.flag_text, "flagged": row.flagged, "visible": visible}


class AbdomenKDSegWebApp:
    """One trame server: one Slicer scene, the module's logic (and its worker), the page."""

    def __init__(self, options: ServeOptions, server: Any = None) -> None:
        from trame.app import get_server
        from trame_slicer import module as trame_slicer_module
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories

        from ..slicer.logic import AbdomenKDSegLogic

        self.options = options
        self.server = server or get_server(client_type="vue3")
        self.server.enable_module(trame_slicer_module)
        self.state, self.ctrl = self.server.state, self.server.controller
        self.work_dir = Path(tempfile.mkdtemp(prefix="AbdomenKDSeg-web-"))
        self.results_dir = self.work_dir / "results"
        self.results_dir.mkdir()
        self.results_url = "results"
        self.server.serve[self.results_url] = str(self.results_dir)

        self.slicer_app = SlicerApp()
        register_rca_factories(self.slicer_app.view_manager, self.server, rca_encoder="turbo-jpeg")
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, self.server)
        self.layout_manager.register_layout_dict(LayoutManager.default_grid_configuration())
        self.layout_manager.set_layout(LAYOUT)

        self.logic = AbdomenKDSegLogic()
        self.logic.pythonExecutable = sys.executable
        self.logic.modelPath = options.model
        self.logic.threads = int(options.threads or 0)
        if options.worker_debug_delay > 0:
            self.logic.workerExtraArgs = ["--debug-delay", str(options.worker_debug_delay)]
        self.logic.logCallback = self._log
        self.volume_node: Any = None
        self.segmentation_node: Any = None
        self._poll_task: asyncio.Task | None = None
        self._run_started = 0.0
        self._init_state()
        self._build_ui()
        self.ctrl.on_client_connected.add(self._client_connected)
        self.ctrl.on_client_exited.add(self._client_exited)
        self.ctrl.on_server_exited.add(self._shutdown)

    # ------------------------------------------------------------------ state
    def _init_state(self) -> None:
        line, demonstration = describe_model(self.options.model)
        s = self.state
        s.trame__title = "AbdomenKDSeg"
        s.model_line, s.demonstration = line, demonstration
        s.busy, s.busy_text = False, ""
        s.progress, s.progress_text = 0.0, ""
        s.message, s.message_type = "", "info"
        s.notes = []
        s.volume_loaded, s.volume_name = False, ""
        s.devices = [{"title": DEVICE_NAMES[d], "value": d} for d in DEVICES]
        s.device = "auto"
        s.organ_choices = [{"title": o.name, "value": o.key} for o in ORGANS]
        s.organs = [o.key for o in ORGANS]
        s.fine = True
        s.preset = "abdomen"
        s.organ_rows = []
        s.summary = ""
        s.labels_url, s.seg_url = "", ""
        s.data_choices = data_choices(self.options.data_dir)
        s.data_choice = None
        s.max_upload_bytes = int(self.options.max_upload_mb * 1e6)
        s.max_upload_text = f"{self.options.max_upload_mb:g} MB"
        s.viewers = 0
        s.run_count = 0
        self._volume_files = 0
        self.state.change("preset")(self._on_preset)

    def _client_connected(self, *_: Any, **__: Any) -> None:
        with self.state:
            self.state.viewers = int(self.state.viewers) + 1

    def _client_exited(self, *_: Any, **__: Any) -> None:
        with self.state:
            self.state.viewers = max(0, int(self.state.viewers) - 1)

    def _log(self, text: str) -> None:
        LOG.info(text)

    def _say(self, message: str, kind: str = "info", notes: list[str] | None = None) -> None:
        """Show ``message`` in the page (``kind``: info, success, warning or error)."""
        with self.state:
            self.state.message, self.state.message_type = message, kind
            self.state.notes = list(notes or [])

    def _refuse_if_busy(self) -> bool:
        """True (and a message) when a load or a run is in progress: every tab shares this scene."""
        if self.state.busy:
            self._say(f"Busy: {self.state.busy_text or 'working'}. Wait for it to finish (or Cancel it) "
                      "before starting something else; every tab of this page shares one scene.", "warning")
            return True
        return False

    def _set_busy(self, text: str) -> None:
        with self.state:
            self.state.busy, self.state.busy_text = bool(text), text

    # ------------------------------------------------------------------ loading
    def load_sample(self) -> None:
        """Load the bundled sample CT."""
        if not self._refuse_if_busy():
            self._load_path(SAMPLE_CT, case_name(SAMPLE_CT.name))

    def load_data_choice(self, name: str | None = None) -> None:
        """Load the ``--data`` entry picked in the list (only names the list offers)."""
        name = name or self.state.data_choice
        if self._refuse_if_busy():
            return
        if not name or name not in data_choices(self.options.data_dir):
            self._say("Pick a CT from the list first.", "warning")
            return
        self._load_path(self.options.data_dir / name, case_name(name))  # type: ignore[operator]

    def load_upload(self, files: Any) -> None:
        """Load an uploaded file (a trame file dict: name, size, content)."""
        if self._refuse_if_busy():
            return
        from trame.app.file_upload import ClientFile

        items = files if isinstance(files, list) else [files]
        if not items or not items[0]:
            self._say("No file was received.", "error")
            return
        upload = ClientFile(items[0])
        name = Path(upload.name or "upload").name
        content = upload.content or b""
        if len(content) > self.state.max_upload_bytes:
            self._say(f"{name} is {len(content) / 1e6:.1f} MB: larger than the {self.state.max_upload_text} "
                      "upload limit (abdomen-kdseg serve --max-upload-mb).", "error")
            return
        if not upload_name_ok(name):
            self._say(f"{name}: not a CT file type this page takes ({', '.join(UPLOAD_SUFFIXES)}; a DICOM "
                      "series as a .zip).", "error")
            return
        folder = Path(tempfile.mkdtemp(prefix="upload-", dir=self.work_dir))
        path = folder / name
        path.write_bytes(content)
        try:
            if name.lower().endswith(".zip"):
                self._set_busy(f"unpacking {name}")
                try:
                    path = extract_dicom_zip(path, folder / "dicom", 4 * int(self.state.max_upload_bytes))
                except InputError as exc:
                    self._say(f"Could not load {name}: {exc}", "error")
                    return
                finally:
                    self._set_busy("")
            self._load_path(path, case_name(name))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _load_path(self, path: Path, name: str) -> None:
        """Read ``path`` with the engine's checks, then show it (replacing the scene's volume and organs)."""
        self._set_busy(f"loading {name}")
        try:
            try:
                image, notes = read_ct(path)
            except (InputError, UsageError) as exc:
                self._say(f"Could not load {name}: {exc}", "error")
                return
            except Exception as exc:  # an unexpected reader failure must not stop the server
                LOG.exception("reading %s", path)
                self._say(f"Could not load {name}: {exc or type(exc).__name__}", "error")
                return
            import SimpleITK as sitk

            self._volume_files += 1
            nrrd = self.work_dir / f"volume-{self._volume_files}.nrrd"
            sitk.WriteImage(image, str(nrrd), False)
            for old in self.work_dir.glob("volume-*.nrrd"):
                if old != nrrd:
                    old.unlink(missing_ok=True)
            self._clear_scene()
            nodes = self.slicer_app.io_manager.load_volumes([str(nrrd)])
            if not nodes:
                self._say(f"Could not load {name}: the viewer could not read it", "error")
                return
            node = nodes[0]
            node.SetName(name)
            self.volume_node = node
            self.slicer_app.display_manager.show_volume_in_slice_background(node)
            self.slicer_app.display_manager.show_volume_in_slice_foreground(None)
            self._apply_preset(self.state.preset)
            self.slicer_app.display_manager.reset_views()
            size = "x".join(str(v) for v in image.GetSize())
            spacing = "x".join(f"{v:.2f}" for v in image.GetSpacing())
            with self.state:
                self.state.volume_loaded, self.state.volume_name = True, name
                self.state.organ_rows, self.state.summary = [], ""
                self.state.labels_url, self.state.seg_url = "", ""
                self.state.progress, self.state.progress_text = 0.0, ""
            self._say(f"Loaded {name}: {size} voxels of {spacing} mm.", "info", [f"Warning: {n}" for n in notes])
        finally:
            self._set_busy("")

    def _clear_scene(self) -> None:
        """Remove the volume and the segmentation of the last load (views and layout stay)."""
        scene = self.slicer_app.scene
        for cls in ("vtkMRMLSegmentationNode", "vtkMRMLVolumeNode"):
            nodes = scene.GetNodesByClass(cls)
            for i in range(nodes.GetNumberOfItems()):
                scene.RemoveNode(nodes.GetItemAsObject(i))
        self.volume_node = self.segmentation_node = None

    # ------------------------------------------------------------------ window/level
    def _on_preset(self, preset: str = "abdomen", **_: Any) -> None:
        self._apply_preset(preset)

    def _apply_preset(self, preset: str) -> None:
        if self.volume_node is None or preset not in PRESETS:
            return
        window, level = PRESETS[preset]
        display = self.volume_node.GetDisplayNode()
        if display is not None:
            display.SetAutoWindowLevel(False)
            display.SetWindowLevel(window, level)

    # ------------------------------------------------------------------ segmentation
    def segment(self) -> None:
        """Start a segmentation of the loaded CT with the page's options."""
        if self._refuse_if_busy():
            return
        if self.volume_node is None:
            self._say("Load a CT first (upload a file, pick one, or load the sample).", "warning")
            return
        organs = list(self.state.organs or [])
        if not organs:
            self._say("Select at least one organ.", "warning")
            return
        if self.segmentation_node is not None and self.segmentation_node.GetScene() is not None:
            self.slicer_app.scene.RemoveNode(self.segmentation_node)
            self.segmentation_node = None
        with self.state:
            self.state.organ_rows, self.state.summary = [], ""
            self.state.labels_url, self.state.seg_url = "", ""
            self.state.progress, self.state.progress_text = 0.0, "Starting"
        self._set_busy(f"segmenting {self.state.volume_name}")
        self._run_started = time.perf_counter()
        try:
            self.segmentation_node = self.logic.segment(
                self.volume_node, device=self.state.device, organs=organs, fine=bool(self.state.fine),
                progress=self._on_progress, waitForCompletion=False)
        except (AbdomenKDSegError, ValueError, RuntimeError) as exc:
            self._set_busy("")
            self._say(f"Could not start the segmentation: {exc}", "error")
            return
        self._say("Segmenting...", "info")
        self._poll_task = asyncio.ensure_future(self._poll())

    def _on_progress(self, text: str, fraction: float) -> None:
        with self.state:
            self.state.progress = round(100.0 * float(fraction), 1)
            self.state.progress_text = text

    async def _poll(self) -> None:
        """Follow the worker until the run ends; then show its result or its error."""
        while True:
            try:
                running = self.logic.poll()
            except Exception as exc:  # the run failed: the logic has already undone it
                self.segmentation_node = None
                self._set_busy("")
                self._say(f"Segmentation failed: {exc}", "error")
                return
            if not running:
                break
            await asyncio.sleep(0.1)
        if self.logic.lastRunInfo is None or self.segmentation_node is None or not self._run_succeeded():
            return  # cancelled: cancel() has said so
        try:
            self._show_result()
        except Exception as exc:
            LOG.exception("showing the result")
            self._say(f"The segmentation finished but could not be shown: {exc}", "error")
        finally:
            self._set_busy("")

    def _run_succeeded(self) -> bool:
        node = self.segmentation_node
        return node is not None and node.GetScene() is not None and node.GetSegmentation().GetNumberOfSegments() > 0

    def _show_result(self) -> None:
        """Surfaces in 3D, the organ table, the downloads."""
        info = self.logic.lastRunInfo
        node = self.segmentation_node
        with self.state:
            self.state.progress_text = "Building 3D surfaces"
        self.logic.showIn3D(node)
        self.slicer_app.display_manager.set_node_visible_in_group(node)
        for view in self.slicer_app.view_manager.get_threed_views():
            view.reset_camera()
            view.reset_view()
        rows = info.organTable()
        folder = self.results_dir / secrets.token_hex(8)
        folder.mkdir()
        stem = Path(self.state.volume_name or "ct").name
        labels = folder / f"{stem}-organs.nii.gz"
        seg = folder / f"{stem}-organs.seg.nrrd"
        write_label_map(node, labels)
        write_segmentation(node, seg)
        seconds = time.perf_counter() - self._run_started
        with self.state:
            self.state.organ_rows = [row_state(r) for r in rows]
            self.state.summary = info.summary()
            self.state.labels_url = f"{self.results_url}/{folder.name}/{labels.name}"
            self.state.seg_url = f"{self.results_url}/{folder.name}/{seg.name}"
            self.state.progress, self.state.progress_text = 100.0, "Done"
            self.state.run_count = int(self.state.run_count) + 1
        flagged = [r.organ.name for r in rows if r.flagged]
        text = f"Done in {seconds:.1f} s: {sum(r.volume_ml is not None for r in rows)} organs found"
        text += f"; outside the FLARE22 range: {', '.join(flagged)}." if flagged else "."
        self._say(text, "success", info.notes())

    def cancel(self) -> None:
        """Cancel the running segmentation (its worker is killed)."""
        if self.logic.cancel():
            self.segmentation_node = None
            with self.state:
                self.state.progress, self.state.progress_text = 0.0, ""
            self._set_busy("")
            self._say("Cancelled.", "warning")

    def toggle_organ(self, key: str, visible: bool) -> None:
        """Show or hide one organ in every view."""
        node = self.segmentation_node
        if node is None or key not in BY_KEY or node.GetDisplayNode() is None:
            return
        node.GetDisplayNode().SetSegmentVisibility(key, bool(visible))
        rows = [dict(r, visible=bool(visible)) if r["key"] == key else r for r in self.state.organ_rows]
        self.state.organ_rows = rows

    def _shutdown(self, **_: Any) -> None:
        self.logic.shutdownWorker()
        shutil.rmtree(self.work_dir, ignore_errors=True)

    # ------------------------------------------------------------------ page
    def _build_ui(self) -> None:
        from trame.ui.vuetify3 import SinglePageWithDrawerLayout
        from trame.widgets import html
        from trame.widgets import vuetify3 as v

        ctrl = self.ctrl
        ctrl.trigger("upload_file")(self.load_upload)
        ctrl.trigger("toggle_organ")(self.toggle_organ)
        with SinglePageWithDrawerLayout(self.server, theme="dark", full_height=True) as layout:
            layout.title.set_text("AbdomenKDSeg")
            layout.drawer.width = 440
            with layout.toolbar:
                v.VSpacer()
                html.Div("{{ volume_name }}", id="volume-name", classes="text-body-2 mr-4")
            with layout.drawer, html.Div(classes="pa-3", style="font-size: 0.9rem;"):
                html.Div("{{ model_line }}", id="model-card", classes="text-caption mb-1")
                html.Div("Demonstration model: not for clinical use.", v_if="demonstration",
                         classes="text-caption text-warning mb-1")
                v.VAlert(v_if="busy", type="warning", density="compact", id="busy-banner", classes="my-2",
                         text=("`Busy: ${busy_text}` + (viewers > 1 ? ` (${viewers} tabs share this scene)` : '')",))
                v.VAlert(v_if="message", type=("message_type",), density="compact", id="message",
                         classes="my-2", text=("message",))
                with html.Div(v_if="notes.length", id="notes", classes="text-caption text-warning mb-2"):
                    html.Div("{{ note }}", v_for="note in notes")
                html.Div("Load a CT", classes="text-subtitle-2 mt-2")
                html.Input(
                    type="file", id="upload-input", accept=",".join(UPLOAD_SUFFIXES), disabled=("busy",),
                    change=("$event.target.files.length && ($event.target.files[0].size > max_upload_bytes"
                            " ? (message = `${$event.target.files[0].name} is larger than the ${max_upload_text}"
                            " upload limit (abdomen-kdseg serve --max-upload-mb).`, message_type = 'error', notes = [])"
                            " : trigger('upload_file', [$event.target.files]))"),
                    style="width: 100%;", classes="my-1")
                html.Div("NIfTI, NRRD, MHA, or a .zip of a DICOM series; up to {{ max_upload_text }}.",
                         classes="text-caption")
                with html.Div(classes="d-flex ga-2 my-2 align-center"):
                    v.VBtn("Load sample CT", id="load-sample", click=self.load_sample, disabled=("busy",),
                           size="small", variant="tonal")
                with html.Div(v_if="data_choices.length", classes="d-flex ga-2 align-center"):
                    v.VSelect(v_model=("data_choice",), items=("data_choices",), label="CT in --data",
                              density="compact", hide_details=True, id="data-select")
                    v.VBtn("Open", id="load-data", click=(self.load_data_choice, "[data_choice]"),
                           disabled=("busy",), size="small")
                html.Div("Window/level", classes="text-subtitle-2 mt-3")
                with v.VBtnToggle(v_model=("preset",), mandatory=True, density="compact", id="presets"):
                    for preset in PRESETS:
                        v.VBtn(preset.capitalize(), value=preset, size="small", id=f"preset-{preset}")
                html.Div("Options", classes="text-subtitle-2 mt-3")
                v.VSelect(v_model=("device",), items=("devices",), label="Device", density="compact",
                          hide_details=True, classes="my-2", id="device-select")
                with v.VSelect(v_model=("organs",), items=("organ_choices",), label="Organs", multiple=True,
                               density="compact", hide_details=True, id="organ-select"):
                    with v.Template(v_slot_selection="{ item, index }"):
                        html.Span("{{ organs.length === organ_choices.length ? 'All 13 organs' : item.title }}",
                                  v_if="index === 0 || (index < 3 && organs.length < organ_choices.length)",
                                  classes="mr-1")
                        html.Span("(+{{ organs.length - 3 }} more)", classes="text-caption",
                                  v_if="index === 3 && organs.length < organ_choices.length")
                v.VCheckbox(v_model=("fine",), label="Fine stage (slower, more accurate)", density="compact",
                            hide_details=True, id="fine-checkbox")
                with html.Div(classes="d-flex ga-2 my-2"):
                    v.VBtn("Segment abdomen", id="segment-button", color="primary", click=self.segment,
                           disabled=("busy || !volume_loaded",))
                    v.VBtn("Cancel", id="cancel-button", click=self.cancel, v_show="busy && progress_text",
                           color="error", variant="tonal")
                v.VProgressLinear(model_value=("progress",), height=8, color="primary", v_show="progress_text",
                                  id="progress-bar")
                html.Div("{{ progress_text }}", id="progress-text", classes="text-caption mb-2")
                html.Div("{{ summary }}", id="summary", v_if="summary", classes="text-caption mb-2")
                with html.Table(v_if="organ_rows.length", id="organ-table",
                                style="width: 100%; border-collapse: collapse; font-size: 0.8rem;"):
                    with html.Tr():
                        for head in ("", "Organ", "mL", "FLARE22 1-99%", ""):
                            html.Th(head, style="text-align: left;")
                    with html.Tr(v_for="row in organ_rows", key="row.key", id=("`organ-${row.key}`",),
                                 classes=("`organ-row status-${row.status.replace(' ', '-')}`",)):
                        with html.Td():
                            html.Input(type="checkbox", checked=("row.visible",), classes="organ-toggle",
                                       change="trigger('toggle_organ', [row.key, $event.target.checked])")
                        with html.Td():
                            html.Span(style=("{display: 'inline-block', width: '10px', height: '10px', "
                                             "marginRight: '4px', background: row.color}",))
                            html.Span("{{ row.name }}")
                        html.Td("{{ row.volume }}", classes="organ-volume", style="text-align: right;")
                        html.Td("{{ row.range }}", style="padding-left: 8px;")
                        html.Td("{{ row.flagged ? (row.status === 'low' ? 'LOW' : 'HIGH') : '' }}",
                                classes="organ-flag text-warning", title=("row.flag",))
                with html.Div(v_if="labels_url", classes="d-flex ga-2 mt-3"):
                    html.A("Label map (.nii.gz)", href=("labels_url",), download=True, id="download-labels")
                    html.A("Segmentation (.seg.nrrd)", href=("seg_url",), download=True, id="download-seg")
            with layout.content, html.Div(style="height: 100%; width: 100%;", id="views"):
                self.layout_manager.initialize_layout_grid(layout)
        self.ui = layout


def write_label_map(segmentation_node: Any, path: Path) -> None:
    """Write the organs as one label map (FLARE22 values) in the input's geometry, e.g. ``.nii.gz``.

    The organ segments share one labelmap layer holding the worker's label values.
    """
    import slicer

    segmentation = segmentation_node.GetSegmentation()
    image = segmentation.GetNthSegment(0).GetRepresentation("Binary labelmap")
    label_node = slicer.vtkMRMLLabelMapVolumeNode()
    slicer.vtkSlicerSegmentationsModuleLogic.CreateLabelmapVolumeFromOrientedImageData(image, label_node)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(1)
    if not storage.WriteData(label_node):
        raise AbdomenKDSegError(f"could not write the label map {path.name}")


def write_segmentation(segmentation_node: Any, path: Path) -> None:
    """Write the segmentation as ``.seg.nrrd`` (names, colors, terminology in its header)."""
    import slicer

    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    if not storage.WriteData(segmentation_node):
        raise AbdomenKDSegError(f"could not write the segmentation {path.name}")


def serve(options: ServeOptions) -> None:
    """Build the app and serve it until interrupted (idle clients never stop it)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("AbdomenKDSeg")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    started = time.perf_counter()
    app = AbdomenKDSegWebApp(options)
    app.ctrl.on_server_ready.add(lambda **_: print(
        f"AbdomenKDSeg web app ready at http://{options.host}:{app.server.port}/ "
        f"({time.perf_counter() - started:.1f} s)", flush=True))
    app.server.start(host=options.host, port=options.port, open_browser=False, timeout=0,
                     show_connection_info=False)
