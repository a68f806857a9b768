"""A throw-away local Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) for the demo, tests and benchmark,
and the loader that fills it with a folder of DICOM films over STOW-RS (``load_folder``, ``demo``).

    with LocalOrthanc() as server:          # 127.0.0.1, free port, HTTP auth with a generated password
        server.settings                     # dicomweb.Settings for the DICOMweb root
        ...

The configuration is generated into a temporary folder that also holds the storage and the index;
both are deleted on exit. The DICOM (DIMSE) port is off: only DICOMweb over HTTP on 127.0.0.1 is used.
Orthanc 1.10 (Debian's) has no setting for the address it listens on (``HttpBindAddresses`` came in a later
release), so its HTTP port is open on every interface; ``RemoteAccessAllowed: false`` makes it refuse every
client that is not on this machine, even with the password (tested).
Orthanc's own output is kept in memory (``server.output()``), never written to a file.
"""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections import deque
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from cxr_core.dicomweb import Client, PacsError, Settings, quiet

ORTHANC = "Orthanc"
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins")
DICOMWEB_PLUGIN = "libOrthancDicomWeb.so"
USER = "cxr"
DEMO_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dicomweb_plugin() -> Path:
    """Path of Debian's DICOMweb plugin; RuntimeError saying how to install it when missing."""
    for folder in PLUGIN_DIRS:
        path = Path(folder) / DICOMWEB_PLUGIN
        if path.is_file():
            return path
    raise RuntimeError("Orthanc's DICOMweb plugin is not installed. Install it with "
                       "'apt-get install orthanc orthanc-dicomweb' and retry.")


class LocalOrthanc:
    """Orthanc on 127.0.0.1:``port`` (default: a free one) with DICOMweb at ``/dicom-web`` and basic auth."""

    def __init__(self, port: int | None = None, *, start_timeout: float = 60.0, lua: str | None = None) -> None:
        if shutil.which(ORTHANC) is None:
            raise RuntimeError("Orthanc is not installed. Install it with 'apt-get install orthanc "
                               "orthanc-dicomweb' and retry.")
        self.port = port or free_port()
        self.password = secrets.token_urlsafe(18)
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = Settings(url=f"{self.url}/dicom-web", username=USER, password=self.password)
        self._start_timeout = start_timeout
        self._lua = lua  # an Orthanc Lua script (tests: a ReceivedInstanceFilter that refuses everything)
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._proc: subprocess.Popen | None = None
        self._output: deque[str] = deque(maxlen=2000)

    def config(self, folder: Path) -> dict:
        """The generated Orthanc configuration (storage under ``folder``)."""
        return {
            "Name": "cxr-demo", "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "index"),
            "Plugins": [str(dicomweb_plugin())], "HttpPort": self.port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True, "RegisteredUsers": {USER: self.password},
            "DicomServerEnabled": False, "DicomPort": free_port(), "SaveJobs": False, "HttpThreadsCount": 8,
            "OverwriteInstances": False, "DeidentifyLogs": True, "StableAge": 1,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "StudiesMetadata": "Full",
                         "SeriesMetadata": "Full"},
        }  # fmt: skip

    def start(self) -> LocalOrthanc:
        """Write the configuration, start Orthanc, wait until it answers (RuntimeError with its output if not)."""
        self._tmp = tempfile.TemporaryDirectory(prefix="cxr-orthanc-")
        folder = Path(self._tmp.name)
        config = self.config(folder)
        if self._lua:
            (folder / "filter.lua").write_text(self._lua)
            config["LuaScripts"] = [str(folder / "filter.lua")]
        (folder / "orthanc.json").write_text(json.dumps(config, indent=2))
        self._proc = subprocess.Popen([ORTHANC, str(folder / "orthanc.json")], stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, errors="replace")
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                output = self.output()
                self.stop()
                raise RuntimeError(f"Orthanc exited with code {self._proc.returncode} at start-up:\n{output[-2000:]}")
            if self._answers():
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on {self.url} within {self._start_timeout:.0f} s.")

    def _drain(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._output.append(line)

    def _answers(self) -> bool:
        token = b64encode(f"{USER}:{self.password}".encode()).decode()
        request = urllib.request.Request(f"{self.url}/system", headers={"Authorization": f"Basic {token}"})
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def output(self) -> str:
        """What Orthanc printed so far (kept in memory only)."""
        return "".join(self._output)

    def stop(self) -> None:
        """Stop Orthanc and delete its configuration, storage and index."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalOrthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def part10(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The dataset with a complete file meta header (files written without one get it from how they parsed)."""
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit, _ = ds.original_encoding
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit is not False else ExplicitVRLittleEndian
    if not getattr(ds, "preamble", None):
        ds.preamble = b"\0" * 128  # written without one, the file would lack the 'DICM' prefix
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta = meta
    return ds


def load_folder(client: Client, folder: str | Path, edit: Callable[[pydicom.Dataset], None] | None = None
                ) -> tuple[int, list[str]]:
    """STOW-RS every DICOM file under ``folder`` (one request each); (stored, messages for the others).

    A file whose SOP Instance UID was already loaded gets a new one derived from its path (the sample
    folder holds re-encodings of the same film); ``edit`` may change each dataset first (tests: canaries).
    """
    seen: set[str] = set()
    stored, problems = 0, []
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(folder).as_posix()
        try:
            with quiet():
                ds = part10(pydicom.dcmread(path, force=True))
            if "SOPInstanceUID" not in ds or "PixelData" not in ds:
                raise ValueError("not a DICOM image")
        except Exception:  # noqa: BLE001 - a non-DICOM file in the folder is reported and skipped
            problems.append(f"{relative}: not a DICOM image, skipped")
            continue
        if ds.SOPInstanceUID in seen:
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(ds.SOPInstanceUID), relative])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        seen.add(str(ds.SOPInstanceUID))
        if edit is not None:
            edit(ds)
        try:
            client.store([ds])
            stored += 1
        except PacsError as err:
            problems.append(f"{relative}: {err}")
    return stored, problems


def demo(port: int | None, folder: Path, stop: threading.Event | None = None) -> None:
    """Start Orthanc, load ``folder``, print the one DICOMweb line, serve until ``stop`` or a signal."""
    stop = stop or threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with LocalOrthanc(port) as server:
        stored, problems = load_folder(Client(server.settings), folder)
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"Loaded {stored} DICOM file(s) from {folder}; stop with Ctrl+C.", file=sys.stderr)
        s = server.settings
        print(f"DICOMweb: {s.url} {s.username} {s.password}", flush=True)
        stop.wait()
