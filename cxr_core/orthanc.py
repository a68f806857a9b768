"""A throw-away local Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) for the demo, tests and benchmark.

    with LocalOrthanc() as server:          # 127.0.0.1, free port, HTTP auth with a generated password
        server.settings                     # dicomweb.Settings for the DICOMweb root
        ...

The configuration is generated into a temporary folder that also holds the storage and the index;
both are deleted on exit. The DICOM (DIMSE) port is off: only DICOMweb over HTTP on 127.0.0.1 is used.
Orthanc's own output is kept in memory (``server.output()``), never written to a file.
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections import deque
from pathlib import Path

from cxr_core.dicomweb import Settings

ORTHANC = "Orthanc"
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins")
DICOMWEB_PLUGIN = "libOrthancDicomWeb.so"
USER = "cxr"


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
