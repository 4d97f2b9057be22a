"""Browser edition end to end: ``abdomen-kdseg serve`` driven by a real headless Chromium (Selenium).

The server is started on 127.0.0.1 as the README says; the browser is Debian's ``chromium`` with
``chromium-driver`` (no browser download). Skipped, with the reason, when trame-slicer, Selenium or
Chromium is missing. Screenshots go to ``$ABDOMENKDSEG_WEB_SCREENSHOTS`` (the README's are made with
``ABDOMENKDSEG_WEB_SCREENSHOTS=Resources/Screenshots``; the timings then go to
``benchmarks/results/web_e2e.json``), else to the test's temporary folder with the timings.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import SimpleITK as sitk

from AbdomenKDSegLib.engine.organs import BY_KEY, ORGANS

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "Resources" / "Sample" / "ct-abdomen-3mm.nii.gz"
DICOM = REPO.parent / "shared" / "data" / "ct-upper-abdomen-dicom"
MAX_UPLOAD_MB = 14
START_TIMEOUT_S = 180
RUN_TIMEOUT_S = 300
TIMINGS: dict[str, float] = {}


def _chromium() -> tuple[str | None, str | None]:
    browser = os.environ.get("CHROME_BIN") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    return browser, driver


def skip_reason() -> str | None:
    """Why the browser tests cannot run here (None: they can)."""
    missing = [m for m in ("trame", "trame_slicer", "selenium") if importlib.util.find_spec(m) is None]
    if missing:
        return (f"browser tests need {', '.join(missing)} in this Python: pip install -e '.[web]' selenium "
                "(see .ci/install)")
    browser, driver = _chromium()
    if not browser or not driver:
        return "browser tests need Chromium and its driver: apt-get install chromium chromium-driver"
    return None


REASON = skip_reason()
if REASON:
    print(f"test_web.py skipped: {REASON}", file=sys.stderr)
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")


# ----------------------------------------------------------------------------- server and browser
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``abdomen-kdseg serve`` in a child process (own process group), its output kept."""

    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.lines: list[str] = []
        started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "AbdomenKDSegLib.cli", "serve", "--port", str(self.port), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(START_TIMEOUT_S) or self.process.poll() is not None:
            self.stop()
            pytest.fail("the web app did not start:\n" + "\n".join(self.lines[-30:]))
        self.start_seconds = time.perf_counter() - started

    def _read(self) -> None:
        for line in self.process.stdout:  # type: ignore[union-attr]
            self.lines.append(line.rstrip())
            if "web app ready at" in line:
                self._ready.set()
        self._ready.set()

    def workers(self) -> list[int]:
        """Pids of the worker processes this server started (they get its pid)."""
        out = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            text = [c.decode(errors="replace") for c in cmd]
            if "AbdomenKDSegLib.slicer.worker" in text and "--parent-pid" in text:
                if text[text.index("--parent-pid") + 1] == str(self.process.pid):
                    out.append(int(proc.name))
        return out

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def wait_for(condition: Callable[[], Any], timeout: float = 60.0, what: Any = "", interval: float = 0.2) -> Any:
    """The first true value of ``condition()`` (exceptions count as false) within ``timeout`` s;
    ``what``: text (or a function giving it) for the error."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # the page is still changing
            last = exc
        time.sleep(interval)
    what = what() if callable(what) else what
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what or condition}" +
                         (f" (last error: {last})" if last else ""))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("web-data")
    shutil.copy(SAMPLE, folder / "sample-copy.nii.gz")
    return folder


@pytest.fixture(scope="module")
def server(data_dir):
    srv = Server("--data", str(data_dir), "--max-upload-mb", str(MAX_UPLOAD_MB), "--threads", "2")
    TIMINGS["server_start_s"] = round(srv.start_seconds, 1)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def slow_server():
    """A server whose worker waits 60 s before each run: Cancel and a second tab meet a busy run."""
    srv = Server("--worker-debug-delay", "60")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1600,1300"):
        options.add_argument(arg)
    options.binary_location = chromium  # type: ignore[assignment]
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("ABDOMENKDSEG_WEB_SCREENSHOTS") or tmp_path_factory.mktemp("web-shots"))
    folder.mkdir(parents=True, exist_ok=True)
    yield folder
    if TIMINGS:  # with the README's screenshots, the timings go to benchmarks/results
        target = REPO / "benchmarks" / "results" if os.environ.get("ABDOMENKDSEG_WEB_SCREENSHOTS") else folder
        TIMINGS["machine"] = f"{os.cpu_count()} CPUs, {sys.platform}"
        (target / "web_e2e.json").write_text(json.dumps(TIMINGS, indent=1) + "\n", encoding="utf-8")


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def text_of(driver, element_id: str) -> str:
    from selenium.common.exceptions import NoSuchElementException

    try:
        return by_id(driver, element_id).text
    except NoSuchElementException:
        return ""


def open_page(driver, url: str) -> None:
    started = time.perf_counter()
    driver.get(url)
    wait_for(lambda: by_id(driver, "load-sample").is_displayed(), 60, "the page")
    TIMINGS.setdefault("page_ready_s", round(time.perf_counter() - started, 1))


def load_sample(driver) -> None:
    by_id(driver, "load-sample").click()
    wait_for(lambda: text_of(driver, "message").startswith("Loaded ct-abdomen-3mm"), 60, "the sample CT to load")


def upload(driver, path: Path, expect: str, timeout: float = 60) -> str:
    """Upload ``path`` with the page's file input; returns the message once it contains ``expect``."""
    previous = text_of(driver, "message")
    by_id(driver, "upload-input").send_keys(str(path))
    return wait_for(lambda: (m := text_of(driver, "message")) != previous and expect in m and m, timeout,
                    lambda: f"'{expect}' after uploading {path.name} (page says: {text_of(driver, 'message')!r})")


def views_rendered(driver) -> bool:
    """True once every view's image arrived (the remote views are <img> elements with a frame)."""
    sizes = driver.execute_script(
        "return Array.from(document.querySelectorAll('#views img')).map(i => i.naturalWidth * i.naturalHeight)")
    return len(sizes) >= 4 and all(s > 0 for s in sizes)


# ----------------------------------------------------------------------------- tests
def test_sample_ct_is_segmented_in_the_browser(server, browser, shots, tmp_path):
    open_page(browser, server.url)
    assert "trained on" in text_of(browser, "model-card") or "Model" in text_of(browser, "model-card")
    load_sample(browser)
    wait_for(lambda: views_rendered(browser), 60, "the slice views")
    started = time.perf_counter()
    by_id(browser, "segment-button").click()
    stages: list[str] = []

    def finished() -> bool:
        text = text_of(browser, "progress-text")
        if text and text not in stages:
            stages.append(text)
        return "Done in" in text_of(browser, "message") or "failed" in text_of(browser, "message")

    wait_for(finished, RUN_TIMEOUT_S, "the segmentation", interval=0.1)
    TIMINGS["first_run_in_browser_s"] = round(time.perf_counter() - started, 1)
    message = text_of(browser, "message")
    assert message.startswith("Done in"), message
    assert len(stages) >= 2, stages  # live progress was shown before the end
    rows = browser.find_elements("css selector", "#organ-table .organ-row")
    assert [r.get_attribute("id") for r in rows] == [f"organ-{o.key}" for o in ORGANS]
    liver = by_id(browser, "organ-liver").text
    liver_ml = float(re.search(r"Liver\s+([\d.]+)", liver).group(1))
    assert 500 < liver_ml < 4000, liver
    assert "1052-2407" in liver  # the FLARE22 1st-99th percentile range (a full-length scan: not scaled)

    time.sleep(2)  # the surfaces' first frame
    browser.save_screenshot(str(shots / "web-app-result.png"))
    # downloads: the label map holds FLARE22 values in the CT's geometry; the .seg.nrrd has terminology
    labels_path = tmp_path / "labels.nii.gz"
    labels_path.write_bytes(urllib.request.urlopen(by_id(browser, "download-labels").get_attribute("href")).read())
    labels = sitk.ReadImage(str(labels_path))
    ct = sitk.ReadImage(str(SAMPLE))
    assert labels.GetSize() == ct.GetSize()
    assert np.allclose(labels.GetOrigin(), ct.GetOrigin(), atol=1e-3)
    array = sitk.GetArrayViewFromImage(labels)
    assert set(np.unique(array)) <= set(range(14)) and (array == BY_KEY["liver"].value).any()
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    assert (array == 1).sum() * voxel_ml == pytest.approx(liver_ml, abs=0.06)
    seg = urllib.request.urlopen(by_id(browser, "download-seg").get_attribute("href")).read(20000)
    assert b"Segment0_Name:=" in seg and b"SCT^10200004^Liver" in seg

    # hide the liver: the toggle is applied, nothing fails
    by_id(browser, "organ-liver").find_element("css selector", ".organ-toggle").click()
    wait_for(lambda: not by_id(browser, "organ-liver").find_element("css selector", ".organ-toggle").is_selected(),
             10, "the liver toggle")

    # a second run reuses the worker with its model loaded
    started = time.perf_counter()
    by_id(browser, "segment-button").click()
    wait_for(lambda: text_of(browser, "message").startswith("Segmenting"), 20, "the second run to start")
    wait_for(lambda: text_of(browser, "message").startswith("Done in"), RUN_TIMEOUT_S, "the second run")
    TIMINGS["second_run_in_browser_s"] = round(time.perf_counter() - started, 1)
    assert len(server.workers()) == 1


def test_presets_and_data_folder(server, browser, shots):
    open_page(browser, server.url)
    by_id(browser, "preset-liver").click()
    browser.execute_script("trame.state.set('data_choice', 'sample-copy.nii.gz')")
    by_id(browser, "load-data").click()
    wait_for(lambda: text_of(browser, "message").startswith("Loaded sample-copy"), 60,
             lambda: f"the --data CT (page says {text_of(browser, 'message')!r})")
    by_id(browser, "preset-bone").click()
    wait_for(lambda: views_rendered(browser), 30, "the views")
    assert "error" not in (by_id(browser, "message").get_attribute("class") or "")


def test_bad_files_give_a_message_and_the_app_keeps_serving(server, browser, shots, tmp_path):
    open_page(browser, server.url)
    text = tmp_path / "notes.nii.gz"
    text.write_text("this is not an image\n")
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.Image([64, 64, 1], sitk.sitkInt16), str(flat))
    bad_zip = tmp_path / "series.zip"
    with zipfile.ZipFile(bad_zip, "w") as archive:
        archive.writestr("series/IM0001.dcm", b"\0" * 4096)
    not_zip = tmp_path / "broken.zip"
    not_zip.write_bytes(b"PK\3\4 truncated")
    big = tmp_path / "big.nii.gz"
    big.write_bytes(os.urandom((MAX_UPLOAD_MB + 1) * 1_000_000))
    other = tmp_path / "report.pdf"
    other.write_bytes(b"%PDF-1.4")
    cases = [(text, "Could not load notes"), (flat, "Could not load flat"), (bad_zip, "no readable DICOM series"),
             (not_zip, "not a readable zip"), (big, "larger than the"), (other, "not a CT file type")]
    for path, expect in cases:
        message = upload(browser, path, expect)
        assert "Traceback" not in message
    browser.save_screenshot(str(shots / "web-app-bad-file.png"))
    if DICOM.is_dir():  # a real DICOM series as a zip is read
        good_zip = tmp_path / "upper-abdomen.zip"
        with zipfile.ZipFile(good_zip, "w", zipfile.ZIP_DEFLATED) as archive:
            for f in sorted(DICOM.iterdir()):
                archive.write(f, f"dicom/{f.name}")
        assert "512x512x20" in upload(browser, good_zip, "Loaded upper-abdomen", timeout=120)
    load_sample(browser)  # still serving
    assert server.process.poll() is None


def test_cancel_mid_run_and_a_second_tab_sees_busy(slow_server, browser, shots):
    open_page(browser, slow_server.url)
    load_sample(browser)
    by_id(browser, "segment-button").click()
    wait_for(lambda: by_id(browser, "cancel-button").is_displayed(), 30, "the Cancel button")
    wait_for(lambda: slow_server.workers(), 60, "the worker process")
    first = browser.current_window_handle
    browser.switch_to.new_window("tab")
    try:
        open_page(browser, slow_server.url)
        banner = wait_for(lambda: text_of(browser, "busy-banner"), 30, "the busy banner in the second tab")
        assert "Busy: segmenting ct-abdomen-3mm" in banner
        wait_for(lambda: "2 tabs share this scene" in text_of(browser, "busy-banner"), 10, "the tab count")
        assert not by_id(browser, "segment-button").is_enabled()
        assert not by_id(browser, "load-sample").is_enabled()
        browser.save_screenshot(str(shots / "web-app-second-tab-busy.png"))
        # a request that still arrives (e.g. a stale page) is refused, not mixed into the run
        browser.execute_script("trame.trigger('upload_file', [[]])")
        wait_for(lambda: text_of(browser, "message").startswith("Busy:"), 10, "the refusal")
    finally:
        browser.close()
        browser.switch_to.window(first)
    started = time.perf_counter()
    by_id(browser, "cancel-button").click()
    wait_for(lambda: text_of(browser, "message") == "Cancelled.", 10, "the cancellation")
    wait_for(lambda: not slow_server.workers(), 10, "the worker to be gone")
    TIMINGS["cancel_to_worker_gone_s"] = round(time.perf_counter() - started, 1)
    assert not text_of(browser, "busy-banner")
    assert by_id(browser, "segment-button").is_enabled()
    assert not browser.find_elements("css selector", "#organ-table .organ-row")
