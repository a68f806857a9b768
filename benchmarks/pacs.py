"""PACS figures: retrieve + classify one CR film from a local Orthanc vs classifying the same file from disk.

    python -m benchmarks            # includes these figures
    python -m benchmarks.pacs       # only these, on the shipped model (prints one JSON object)

- ``pacs_classify_ms_p50``  WADO-RS retrieve (stored JPEG 2000, basic auth, 127.0.0.1) + the classify path
                            of the PACS page (Part 10 bytes in memory -> ``pipeline.classify``)
- ``disk_classify_ms_p50``  ``pipeline.classify`` on the same file read from disk
Target: ``pacs_classify_ms_p50 <= 1.5 x disk_classify_ms_p50``. None where Orthanc is not installed.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from benchmarks.machine import median_ms
from benchmarks.serving import DICOM


def pacs_figures(classifier, explainer, repeat: int, path: Path = DICOM) -> dict[str, float | None]:
    """Median ms of retrieve + classify from a fresh local Orthanc, and of classify from disk."""
    from cxr_core import dicomweb, imaging, pipeline
    from cxr_core.orthanc import LocalOrthanc

    if shutil.which("Orthanc") is None:
        return {"pacs_classify_ms_p50": None, "disk_classify_ms_p50": None}
    import pydicom

    with LocalOrthanc() as server:
        client = dicomweb.Client(server.settings)
        ds = pydicom.dcmread(path)
        client.store([ds])
        (film,) = [i for i in client.instances(str(ds.StudyInstanceUID)) if i.sop_uid == ds.SOPInstanceUID]

        def from_pacs() -> None:
            data = client.retrieve(film)  # what the PACS page does: the bytes, the header, then the pipeline
            imaging.read_header(data)
            pipeline.classify(classifier, explainer, data, "film")

        def from_disk() -> None:
            pipeline.classify(classifier, explainer, path.read_bytes(), path.name)

        pacs_ms = median_ms(from_pacs, repeat, warmup=2)
        disk_ms = median_ms(from_disk, repeat, warmup=2)
    return {"pacs_classify_ms_p50": round(pacs_ms, 1), "disk_classify_ms_p50": round(disk_ms, 1)}


def main() -> int:
    from benchmarks import serving
    from benchmarks.machine import machine_info

    folder, origin = serving.model_folder(None)
    _, classifier, explainer = serving.load_seconds(folder)
    figures = pacs_figures(classifier, explainer, repeat=int(sys.argv[1]) if len(sys.argv) > 1 else 10)
    ratio = (figures["pacs_classify_ms_p50"] / figures["disk_classify_ms_p50"]
             if figures["disk_classify_ms_p50"] else None)
    print(json.dumps({**figures, "ratio": None if ratio is None else round(ratio, 3), "target": "ratio <= 1.5",
                      "pass": None if ratio is None else ratio <= 1.5, "model": str(folder), "origin": origin,
                      "file": str(DICOM.name), "machine": machine_info()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
