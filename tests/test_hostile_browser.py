"""Issue 15 against a real server: ``streamlit run app.py`` in Chromium, one file of each failure class
among good films in a server folder, uploads of the file classes on the classify page, and a forged
model folder beside the good one. Every good film is scored, every bad file gets its message, and no
page shows a traceback.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from badinput import FORMULA_NAMES, KERMANY_JPEG, chest_gray, dicom_bytes, dicom_with, hostile_cases
from test_phi import download

from cxr_core import csvsafe
from cxr_core.card import CARD_FILE, content_sha256

pytestmark = [pytest.mark.browser, pytest.mark.slow]

GOOD_JPEG = KERMANY_JPEG.read_bytes()
# name on disk -> (bytes, lower-case fragment of the message; "" for a film that must be scored)
BAD = {name: (case.data, case.fragment) for name, case in
       ((c.name, c) for c in hostile_cases() if not c.ok and c.name != "zeros.dcm")}


def _window_outlier() -> bytes:
    """F2: window 1200/400, tissue 1000-1400, one pixel at 65535."""
    stored = np.full((64, 64), 1200, np.uint16)
    stored[:, :32] = np.linspace(1000, 1400, 32).astype(np.uint16)
    stored[0, 0] = 65535
    return dicom_with(stored, WindowCenter="1200", WindowWidth="400")


def _folder(root: Path) -> tuple[dict[str, str], set[str]]:
    """Write the batch folder; return (shown name -> message fragment for bad files, shown names of good films)."""
    good = {"chest.jpeg": GOOD_JPEG, "chest.dcm": dicom_bytes(chest_gray()), "window.dcm": _window_outlier()}
    for case in hostile_cases():
        if case.ok:
            good[case.name] = case.data  # F1 float TIFF with inf, F3 strips, RGBA
    for name in FORMULA_NAMES:  # F5: formula-like names holding good films
        if "/" not in name:
            good[name] = GOOD_JPEG
    for name, data in good.items():
        (root / name).write_bytes(data)
    (root / os.fsdecode(b"chest\xff.jpeg")).write_bytes(GOOD_JPEG)  # F4: not UTF-8
    for name, (data, _) in BAD.items():
        (root / name).write_bytes(data)
    with open(root / "zeros.dcm", "wb") as fh:  # F7: 100 MB of zeros
        fh.truncate(100 << 20)
    os.mkfifo(root / "pipe.dcm")  # a FIFO in the folder must not block the scan
    bad = {name: fragment for name, (_, fragment) in BAD.items()} | {"zeros.dcm": "not one"}
    return bad, set(good) | {"chest\ufffd.jpeg"}


def _forge(good: Path, forged: Path) -> None:
    """F8: a copy of the good model folder whose card asks for 100000 px input, re-hashed as a forger would."""
    shutil.copytree(good, forged)
    data = json.loads((forged / CARD_FILE).read_text())
    data["input_size"] = 100000
    data["card_sha256"] = content_sha256(data)
    (forged / CARD_FILE).write_text(json.dumps(data))


def _no_traceback(page, where: str) -> None:
    from benchmarks.app_render import wait_idle

    wait_idle(page)
    assert page.locator('[data-testid="stException"]').count() == 0, f"an exception is shown on {where}"
    assert "Traceback" not in page.content(), where


def test_hostile_folder_uploads_and_forged_model_in_chromium(tiny_model_dir, tmp_path):
    from playwright.sync_api import sync_playwright

    from benchmarks.app_render import CHROMIUM, CHROMIUM_ARGS, free_port, start_server, stop, upload, wait_healthy

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium), as .ci/run does")
    models = tmp_path / "models"
    shutil.copytree(tiny_model_dir, models / "a-good")
    _forge(tiny_model_dir, models / "z-forged")
    root = tmp_path / "data"
    root.mkdir()
    bad, good = _folder(root)
    port = free_port()
    proc = start_server(models, port, env={"CXR_DATA_ROOT": str(root)})
    try:
        wait_healthy(port, 120)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(accept_downloads=True, viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(180_000)
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector('[data-testid="stFileUploader"]')
            # Classify page: each file class as an upload ends in a decision or its message, never a traceback.
            uploads = {"window.dcm": (_window_outlier(), "")}
            uploads |= {c.name: (c.data, "") for c in hostile_cases() if c.ok}
            uploads |= {name: BAD[name] for name in ("slope_inf.dcm", "deflated_liar.dcm", "rgb_as_mono2.dcm")}
            for name, (data, fragment) in uploads.items():
                upload(page, name, data)
                _no_traceback(page, f"the classify page with {name}")
                if fragment:
                    page.locator('[data-testid="stAlert"]', has_text=re.compile(re.escape(fragment), re.I)).wait_for()
                    assert page.locator('h3:has-text("Decision:")').count() == 0, name
                else:
                    page.wait_for_selector('h3:has-text("Decision:")')
                if name == "rgba.png":  # the transparency is stated, not dropped silently
                    page.get_by_text("composited on black").first.wait_for()
                if name == "window.dcm":  # F2: the sliders are drawn with the file's own window inside their bounds
                    page.get_by_text("Window center").first.wait_for()
            # Batch review of the server folder.
            page.goto(f"http://127.0.0.1:{port}/batch")
            page.get_by_text("Folder on the server").click()
            page.get_by_role("button", name="Score folder").click()
            page.get_by_text(f"{len(bad) + len(good)} file(s): ").wait_for()
            _no_traceback(page, "the batch page")
            assert page.get_by_text(f"{len(bad)} unreadable").count() == 1
            label = f"Download these {len(bad) + len(good)} rows as CSV"
            rows = list(csv.DictReader(io.StringIO(download(page, label).decode("utf-8"), newline="")))
            # The forged model: chosen in the sidebar, refused with its reason.
            page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').first.click()
            page.get_by_role("option", name="z-forged").click()
            page.get_by_text("input_size must be at least").wait_for()
            _no_traceback(page, "the batch page with the forged model")
            browser.close()
    finally:
        log = stop(proc)
    assert "Traceback" not in log, log[-3000:]
    by_name = {csvsafe.restore(r["file"]): r for r in rows}
    assert set(by_name) == set(bad) | good
    assert all(not r["file"].startswith(csvsafe.TRIGGERS) for r in rows)  # F5
    for name in good:
        assert by_name[name]["error"] == "" and by_name[name]["decision"] in ("NORMAL", "PNEUMONIA"), name
    for name, fragment in bad.items():
        assert fragment in by_name[name]["error"].lower() and by_name[name]["decision"] == "", name
