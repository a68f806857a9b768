"""Patient data never leaves the upload: no DICOM patient tag on screen, in a log, the CSV or the report,
and no uploaded byte on disk.

Real DICOM files get known patient values (name, id, birth date, accession number,
institution, physician) and a unique marker in a private tag; the classify and batch pages
(AppTest, in this process) then read, classify, export and report them while TMPDIR points
at a fresh folder and every log record and byte of stdout/stderr is captured. Afterwards
every file written under TMPDIR, in the checkout or in ~/.streamlit since the test began,
the page text, the CSV, both report formats and the logs are searched for those values.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from badinput import KERMANY_JPEG
from phi_inputs import MARKER, NEEDLES, PHI, SOURCES, damaged_with_phi, find_needles, with_phi
from streamlit.runtime.media_file_manager import MediaFileManager
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
from streamlit.testing.v1 import AppTest

REPO = Path(__file__).resolve().parents[1]


def written_files(folders: list[Path], since: float) -> Iterator[Path]:
    """Regular files under ``folders`` modified at or after ``since`` (skipping the venv and git objects)."""
    for folder in folders:
        if not folder.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if d not in (".venv", ".git", "node_modules")]
            for name in filenames:
                path = Path(dirpath) / name
                try:
                    if path.is_file() and not path.is_symlink() and path.stat().st_mtime >= since:
                        yield path
                except OSError:
                    continue


@pytest.fixture()
def uploads() -> dict[str, bytes]:
    data = {name: with_phi(path) for name, path in SOURCES.items()}
    for name, blob in data.items():  # the test is only meaningful if the uploads do carry the PHI
        assert MARKER.encode() in blob and PHI["PatientID"].encode() in blob, name
    return data


@pytest.fixture()
def damaged() -> tuple[str, bytes]:
    """The damaged upload, checked to make pydicom quote the patient's name and id when read (the test is
    only meaningful if it does)."""
    blob = damaged_with_phi()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        try:
            pydicom.dcmread(io.BytesIO(blob), force=True)
        except Exception:
            pass
    quoted = " ".join(str(w.message) for w in said)
    assert PHI["PatientName"] in quoted and PHI["PatientID"] in quoted, quoted[:300]
    return "damaged.dcm", blob


@pytest.fixture()
def isolated(tmp_path, monkeypatch, tiny_model_dir) -> dict[str, object]:
    """TMPDIR and tempfile pointed at an empty folder; the tiny model served; every log record captured."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    models_root = tmp_path / "models"
    shutil.copytree(tiny_model_dir, models_root / tiny_model_dir.name)
    monkeypatch.setenv("CXR_MODELS_DIR", str(models_root))
    monkeypatch.delenv("CXR_DATA_ROOT", raising=False)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.DEBUG)
    loggers = [logging.getLogger(), logging.getLogger("streamlit"), logging.getLogger("cxr_core")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    yield {"tmp": tmp, "log": stream, "start": time.time() - 1}
    for lg, level in zip(loggers, levels, strict=True):
        lg.removeHandler(handler)
        lg.setLevel(level)


def page_text(at: AppTest) -> str:
    """Every element the page sent, as protobuf text (values, captions, tables, help texts)."""
    parts = []

    def walk(node) -> None:
        proto = getattr(node, "proto", None)
        if proto is not None:
            parts.append(str(proto))
        for child in getattr(node, "children", {}).values():
            walk(child)

    walk(at._tree)
    return "\n".join(parts)


def test_no_patient_data_in_pages_logs_exports_reports_or_disk(uploads, damaged, isolated, monkeypatch, capfd):
    saved: list[tuple[object, str | None]] = []
    deferred: list[tuple[object, str | None]] = []
    store = MemoryMediaFileStorage.load_and_get_id
    add_deferred = MediaFileManager.add_deferred

    def record_media(self, path_or_data, mimetype, kind, filename=None):
        saved.append((path_or_data, filename))
        return store(self, path_or_data, mimetype, kind, filename)

    def record_deferred(self, data_callable, mimetype, coordinates, file_name=None, **kwargs):
        deferred.append((data_callable, file_name))
        return add_deferred(self, data_callable, mimetype, coordinates, file_name=file_name, **kwargs)

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", record_media)
    monkeypatch.setattr(MediaFileManager, "add_deferred", record_deferred)
    texts: list[tuple[str, str]] = []

    classify = AppTest.from_file(str(REPO / "pages" / "classify.py"), default_timeout=180).run()
    for name, data in uploads.items():
        classify.file_uploader(key="classify_upload").set_value((name, data, "application/dicom")).run()
        assert not classify.exception, [e.value for e in classify.exception]
        assert any(m.value.startswith("### Decision:") for m in classify.markdown), name  # it really ran
        texts.append((page_text(classify), f"classify page for {name}"))
    classify.file_uploader(key="classify_upload").set_value((*damaged, "application/dicom")).run()
    assert not classify.exception and classify.error, "the damaged DICOM got no clear error"
    texts.append((page_text(classify), "classify page for the damaged DICOM"))
    reports = [(fn(), file_name) for fn, file_name in deferred if file_name and file_name.startswith("cxr-report")]
    assert {name for _, name in reports} >= {"cxr-report.png", "cxr-report.pdf"}
    assert all(len(blob) > 10_000 for blob, _ in reports)

    batch = AppTest.from_file(str(REPO / "pages" / "batch.py"), default_timeout=180).run()
    files = [(n, d, "application/dicom") for n, d in [*uploads.items(), damaged]]
    files.append(("normal.jpeg", KERMANY_JPEG.read_bytes(), "image/jpeg"))
    batch.file_uploader(key="batch_upload").set_value(files).run()
    batch.button(key="batch_score_upload").click().run()
    assert not batch.exception, [e.value for e in batch.exception]
    texts.append((page_text(batch), "batch page"))
    csvs = [fn() for fn, filename in deferred if filename == "batch_review.csv"]  # made when fetched
    assert csvs, "the batch page offered no CSV"
    csv = csvs[-1] if isinstance(csvs[-1], bytes) else str(csvs[-1]).encode()
    assert all(name.encode() in csv for name in ("study1.dcm", "study2.dcm", "damaged.dcm", "normal.jpeg"))

    out, err = capfd.readouterr()
    # The detector itself finds every needle where they are (the uploads), in either encoding.
    assert len(find_needles(uploads["study1.dcm"], "upload")) >= len(NEEDLES)
    leaks = []
    for text, where in texts:
        leaks += find_needles(text, where)
    for blob, name in reports:
        leaks += find_needles(blob, f"report {name}")
    leaks += find_needles(csv, "batch CSV export")
    for data, filename in saved:
        if isinstance(data, bytes | str):
            leaks += find_needles(data, f"media file {filename}")
    leaks += find_needles(isolated["log"].getvalue(), "log records")
    leaks += find_needles(out + err, "stdout/stderr")
    home = Path.home() / ".streamlit"
    scanned = list(written_files([isolated["tmp"], REPO, home], isolated["start"]))
    for path in scanned:
        try:
            content = path.read_bytes()
        except OSError:
            continue
        leaks += find_needles(content, str(path))
        for name, data in uploads.items():  # a slice of the pixel data too, not only the marker
            if data[len(data) // 2:len(data) // 2 + 64] in content:
                leaks.append(f"bytes of upload {name} in {path}")
    assert not leaks, "\n".join(leaks)
    # The only files written to TMPDIR are TensorFlow's traced Python sources (autograph), never data.
    in_tmp = [p.name for p in written_files([isolated["tmp"]], 0)]
    assert all(n.startswith("__autograph_generated_file") and n.endswith(".py") for n in in_tmp), in_tmp


def download(page, label: str, tries: int = 3) -> bytes:
    """Click a download button once the page is idle and return the file's bytes (a click that lands
    while a rerun replaces the button is lost, so it is retried)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    from benchmarks.app_render import wait_idle

    for attempt in range(tries):
        wait_idle(page)
        try:
            with page.expect_download(timeout=30_000) as info:
                page.get_by_role("button", name=label).click()
            return Path(info.value.path()).read_bytes()
        except PlaywrightTimeout:
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


@pytest.mark.browser
@pytest.mark.slow
def test_no_patient_data_through_a_real_server(uploads, damaged, tiny_model_dir, tmp_path):
    """The same search against ``streamlit run app.py`` driven by Chromium: the server's own output, its
    TMPDIR, the pages' HTML, and the report and CSV as the browser downloads them."""
    from playwright.sync_api import sync_playwright

    from benchmarks.app_render import CHROMIUM, CHROMIUM_ARGS, free_port, start_server, stop, upload, wait_healthy

    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    shutil.copytree(tiny_model_dir, tmp_path / "models" / "served")
    start = time.time() - 1
    port = free_port()
    proc = start_server(tmp_path / "models", port, env={"TMPDIR": str(tmp), "STREAMLIT_LOGGER_LEVEL": "debug"})
    downloads: dict[str, bytes] = {}
    html: list[str] = []
    try:
        wait_healthy(port, 120)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(accept_downloads=True)
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector('[data-testid="stFileUploader"]', timeout=120_000)
            for name, data in uploads.items():
                upload(page, name, data, "application/dicom")
                page.wait_for_selector('h3:has-text("Decision:")', timeout=60_000)
                html.append(page.content())
            for label in ("Download report (PNG)", "Download report (PDF)"):
                downloads[label] = download(page, label)
            upload(page, damaged[0], damaged[1], "application/dicom")  # pydicom quotes the PHI reading it
            page.locator('[data-testid="stAlert"]', has_text="The DICOM file").wait_for(timeout=60_000)
            html.append(page.content())
            page.goto(f"http://127.0.0.1:{port}/batch")
            page.wait_for_selector('[data-testid="stFileUploader"]', timeout=120_000)
            batch = [*uploads.items(), damaged]
            page.set_input_files('[data-testid="stFileUploader"] input[type="file"]',
                                 files=[{"name": n, "mimeType": "application/dicom", "buffer": d} for n, d in batch])
            page.get_by_role("button", name=f"Score {len(batch)} file(s)").click(timeout=60_000)
            page.get_by_role("button", name=f"Download these {len(batch)} rows as CSV").wait_for(timeout=120_000)
            downloads["CSV"] = download(page, f"Download these {len(batch)} rows as CSV")
            html.append(page.content())
            browser.close()
    finally:
        output = stop(proc)
    assert downloads["Download report (PNG)"].startswith(b"\x89PNG")
    assert downloads["Download report (PDF)"].startswith(b"%PDF")
    assert all(name.encode() in downloads["CSV"] for name in ("study1.dcm", "study2.dcm", "damaged.dcm"))
    leaks = find_needles(output, "server stdout/stderr")
    for i, text in enumerate(html):
        leaks += find_needles(text, f"page HTML {i}")
    for what, blob in downloads.items():
        leaks += find_needles(blob, what)
    for path in written_files([tmp, REPO, Path.home() / ".streamlit"], start):
        try:
            leaks += find_needles(path.read_bytes(), str(path))
        except OSError:
            continue
    assert not leaks, "\n".join(leaks)
    in_tmp = [p.name for p in written_files([tmp], 0)]
    assert all(n.startswith("__autograph_generated_file") and n.endswith(".py") for n in in_tmp), in_tmp
