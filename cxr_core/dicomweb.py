"""A DICOMweb client for the department's archive (QIDO-RS search, WADO-RS retrieve, STOW-RS store).

    settings = dicomweb.load_settings(secrets.get("pacs"))     # or env CXR_PACS_URL... ; None: PACS off
    client = dicomweb.Client(settings)
    studies = client.search_studies(modality="CR", date_from=date(2004, 1, 1))
    data = client.retrieve(client.instances(studies[0].study_uid)[0])   # DICOM Part 10 bytes, in memory

Built on ``dicomweb-client``. Retrieval asks for the stored transfer syntax (``transfer-syntax=*``), so
compressed films come back as stored and are decoded by ``cxr_core.imaging`` like a file from disk.
Every failure ends as ``PacsError`` with a message that says what was wrong and what to do; messages
and ``repr`` never hold the password or token, and nothing read from the PACS is logged or written
to disk. Search results keep only what is needed to choose a study (no patient name or ID).
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pydicom
import requests
from dicomweb_client import DICOMwebClient

T = TypeVar("T")
ENV = {"url": "CXR_PACS_URL", "username": "CXR_PACS_USER", "password": "CXR_PACS_PASSWORD",
       "token": "CXR_PACS_TOKEN", "verify": "CXR_PACS_VERIFY", "timeout": "CXR_PACS_TIMEOUT",
       "max_instances": "CXR_PACS_MAX_INSTANCES"}  # fmt: skip
RADIOGRAPHY = ("CR", "DX", "DR")
STUDY_FIELDS = ("StudyInstanceUID", "AccessionNumber", "StudyDate", "StudyDescription", "ModalitiesInStudy",
                "NumberOfStudyRelatedInstances")
INSTANCE_FIELDS = ("SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality", "ViewPosition",
                   "BodyPartExamined", "SeriesDescription", "InstanceNumber", "SeriesNumber")
ANY_TRANSFER_SYNTAX = (("application/dicom", "*"),)
# dicomweb-client and urllib3 log every URL at INFO/DEBUG, and PACS URLs hold UIDs and search terms.
for _name in ("dicomweb_client", "urllib3.connectionpool"):
    logging.getLogger(_name).setLevel(logging.WARNING)


@contextmanager
def quiet() -> Iterator[None]:
    """Silence pydicom's and highdicom's warnings and log records while a dataset from the PACS is handled:
    some quote the offending value, which may be a patient's name (not thread-safe: it flips the logger)."""
    logger = logging.getLogger("pydicom")
    disabled, logger.disabled = logger.disabled, True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.disabled = disabled


class PacsError(RuntimeError):
    """The PACS could not be used; ``str(err)`` says why and what to do (never a password or token)."""


@dataclass(frozen=True)
class Settings:
    """How to reach the DICOMweb root: basic auth (username/password) or a bearer ``token``; seconds."""

    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    verify: bool | str = True  # False turns TLS checks off; a path names a CA bundle
    timeout: float = 30.0
    max_instances: int = 50  # instances read from one study at most

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PacsError("The PACS URL must be an http:// or https:// address of the DICOMweb root, "
                            "e.g. https://pacs.example.org/dicom-web. Fix 'url' in the [pacs] settings.")
        if parts.username or parts.password:
            raise PacsError("The PACS URL must not hold a user name or password; put them in 'username' and "
                            "'password' (or 'token') in the [pacs] settings.")
        if not self.timeout > 0 or self.max_instances < 1:
            raise PacsError("The PACS 'timeout' (seconds) and 'max_instances' must be positive numbers.")

    @property
    def host(self) -> str:
        """host:port of the server, for messages (never credentials)."""
        return urlsplit(self.url).netloc


def _flag(value: Any) -> bool | str:
    if isinstance(value, bool):
        return value
    text = str(value).strip()
    if text.lower() in ("0", "false", "no", "off"):
        return False
    return True if text.lower() in ("", "1", "true", "yes", "on") else text


def load_settings(section: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
                  ) -> Settings | None:
    """Settings from a secrets ``[pacs]`` section, else from CXR_PACS_* environment variables; None if neither
    names a URL (the PACS features are then off). Raises PacsError for settings that are present but wrong."""
    environ = os.environ if environ is None else environ
    values = dict(section or {})
    if not values.get("url"):
        values = {key: environ[name] for key, name in ENV.items() if environ.get(name)}
    if not values.get("url"):
        return None
    unknown = sorted(set(values) - set(ENV))
    if unknown:
        raise PacsError(f"Unknown PACS setting(s) {', '.join(unknown)}; the known ones are {', '.join(ENV)}.")
    try:
        return Settings(url=str(values["url"]).rstrip("/"), username=values.get("username") or None,
                        password=values.get("password") or None, token=values.get("token") or None,
                        verify=_flag(values.get("verify", True)), timeout=float(values.get("timeout", 30)),
                        max_instances=int(values.get("max_instances", 50)))
    except (TypeError, ValueError) as exc:
        raise PacsError("The PACS 'timeout' and 'max_instances' settings must be numbers.") from exc


@dataclass(frozen=True)
class Study:
    """One study as the worklist shows it: no patient name or ID, only what is needed to pick it."""

    study_uid: str
    accession: str
    date: str  # YYYY-MM-DD, or "" when the PACS did not say
    description: str
    modalities: str
    films: int | None  # NumberOfStudyRelatedInstances, None when not given


@dataclass(frozen=True)
class Instance:
    """One stored object of a study, with the tags that decide whether it is a film to classify."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class: str
    modality: str
    view_position: str
    body_part: str
    series_description: str
    number: int | None


def _value(item: Mapping[str, Any], keyword: str) -> str:
    """First value of a DICOM JSON attribute as text; '' when missing or odd (QIDO answers vary)."""
    try:
        attribute = item.get(f"{pydicom.datadict.tag_for_keyword(keyword):08X}")
        values = attribute.get("Value") if isinstance(attribute, Mapping) else None
        if not values:
            return ""
        first = values[0]
        if isinstance(first, Mapping):  # person names come as {"Alphabetic": ...}
            return str(first.get("Alphabetic", ""))
        return "\\".join(str(v) for v in values) if keyword == "ModalitiesInStudy" else str(first)
    except (AttributeError, TypeError, IndexError):
        return ""


def _int(text: str) -> int | None:
    try:
        return int(float(text))
    except ValueError:
        return None


def _date(text: str) -> str:
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) >= 8 and text[:8].isdigit() else ""


def _study(item: Mapping[str, Any]) -> Study | None:
    uid = _value(item, "StudyInstanceUID")
    if not uid:
        return None  # an answer without a study UID cannot be opened
    return Study(uid, _value(item, "AccessionNumber"), _date(_value(item, "StudyDate")),
                 _value(item, "StudyDescription"), _value(item, "ModalitiesInStudy"),
                 _int(_value(item, "NumberOfStudyRelatedInstances")))


def _instance(item: Mapping[str, Any], study_uid: str) -> Instance | None:
    series, sop = _value(item, "SeriesInstanceUID"), _value(item, "SOPInstanceUID")
    if not series or not sop:
        return None
    return Instance(study_uid, series, sop, _value(item, "SOPClassUID"), _value(item, "Modality").upper(),
                    _value(item, "ViewPosition").upper(), _value(item, "BodyPartExamined").upper(),
                    _value(item, "SeriesDescription"), _int(_value(item, "InstanceNumber")))


def _date_range(start: date | None, end: date | None) -> str | None:
    if start is None and end is None:
        return None
    if start and end and start > end:
        raise PacsError(f"The search starts ({start}) after it ends ({end}). Swap the dates and search again.")
    return f"{start.strftime('%Y%m%d') if start else ''}-{end.strftime('%Y%m%d') if end else ''}"


class Client:
    """DICOMweb client for one PACS; every call raises only ``PacsError``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        session = requests.Session()
        session.verify = settings.verify
        session.trust_env = False  # no proxy or .netrc credentials picked up behind the user's back
        if settings.token:
            session.headers["Authorization"] = f"Bearer {settings.token}"
        elif settings.username:
            session.auth = (settings.username, settings.password or "")
        self._web = DICOMwebClient(settings.url, session=session, timeout=settings.timeout)
        # Its retries also catch refused connections and timeouts, five times with waits of 2-16 s: a page
        # would hang for half a minute before saying the PACS is down. One attempt, then a clear message.
        self._web.set_http_retry_params(retry=False)

    def _call(self, doing: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one request, turning every failure into a PacsError that says what to do."""
        host = self.settings.host
        try:
            return fn(*args, **kwargs)
        except requests.exceptions.SSLError as exc:
            raise PacsError(f"The TLS certificate of the PACS at {host} could not be verified while {doing}. "
                            "Ask for its CA bundle and name it in 'verify' in the [pacs] settings.") from exc
        except requests.exceptions.Timeout as exc:
            raise PacsError(f"The PACS at {host} did not answer within {self.settings.timeout:g} s while {doing}. "
                            "Retry later, narrow the search, or raise 'timeout' in the [pacs] settings.") from exc
        except requests.exceptions.ConnectionError as exc:
            raise PacsError(f"The PACS at {host} cannot be reached (server down or unreachable) while {doing}. "
                            "Check that it is running and the 'url' in the [pacs] settings, then retry.") from exc
        except requests.exceptions.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else 0
            if code in (401, 403):
                raise PacsError(f"The PACS at {host} refused the credentials (HTTP {code}) while {doing}. Check "
                                "'username' and 'password' (or 'token') in the [pacs] settings.") from exc
            raise PacsError(f"The PACS at {host} answered HTTP {code} while {doing}. "
                            "Check that 'url' names its DICOMweb root, or ask its administrator.") from exc
        except PacsError:
            raise
        except Exception as exc:  # odd answers (bad JSON, broken multipart...) from the server
            raise PacsError(f"The PACS at {host} sent an answer that could not be understood while {doing} "
                            f"({type(exc).__name__}). Ask its administrator, or retry.") from exc

    def search_studies(self, *, date_from: date | None = None, date_to: date | None = None, accession: str = "",
                       modality: str | Sequence[str] = RADIOGRAPHY, body_part: str = "", limit: int = 100
                       ) -> list[Study]:
        """Studies matching all given criteria, newest first; ``modality`` one code or several (any of)."""
        filters: dict[str, str] = {}
        if (dates := _date_range(date_from, date_to)) is not None:
            filters["StudyDate"] = dates
        if accession.strip():
            filters["AccessionNumber"] = accession.strip()
        found: dict[str, Study] = {}
        for code in [modality] if isinstance(modality, str) else list(modality):
            query = {**filters, "ModalitiesInStudy": code} if code else filters
            answer = self._call("searching for studies", self._web.search_for_studies, search_filters=query,
                                fields=list(STUDY_FIELDS), limit=limit)
            for item in answer if isinstance(answer, list) else []:
                study = _study(item) if isinstance(item, Mapping) else None
                if study is not None:
                    found.setdefault(study.study_uid, study)
        if body_part.strip():  # a series attribute: asked per study found, so the query stays bounded
            part = {"BodyPartExamined": body_part.strip().upper()}
            found = {uid: study for uid, study in found.items()
                     if self._call("searching for series by body part", self._web.search_for_series,
                                   study_instance_uid=uid, search_filters=part, fields=["BodyPartExamined"], limit=1)}
        return sorted(found.values(), key=lambda s: (s.date, s.accession), reverse=True)[:limit]

    def instances(self, study_uid: str) -> list[Instance]:
        """Every instance of a study (images, reports...), in series and instance order."""
        answer = self._call("listing the study's images", self._web.search_for_instances,
                            study_instance_uid=study_uid, fields=list(INSTANCE_FIELDS))
        found = [_instance(item, study_uid) for item in answer if isinstance(item, Mapping)]
        return sorted((i for i in found if i is not None), key=lambda i: (i.series_uid, i.number or 0, i.sop_uid))

    def series_descriptions(self, study_uid: str) -> dict[str, str]:
        """Series UID -> description for every series of a study."""
        answer = self._call("listing the study's series", self._web.search_for_series,
                            study_instance_uid=study_uid, fields=["SeriesDescription"])
        return {_value(item, "SeriesInstanceUID"): _value(item, "SeriesDescription")
                for item in answer if isinstance(item, Mapping) and _value(item, "SeriesInstanceUID")}

    def retrieve_dataset(self, instance: Instance) -> pydicom.Dataset:
        """One instance as stored (any transfer syntax), parsed in memory."""
        with quiet():
            return self._call("retrieving an image", self._web.retrieve_instance, instance.study_uid,
                              instance.series_uid, instance.sop_uid, media_types=ANY_TRANSFER_SYNTAX)

    def retrieve(self, instance: Instance) -> bytes:
        """One instance as DICOM Part 10 bytes (stored transfer syntax), in memory only."""
        return to_bytes(self.retrieve_dataset(instance))

    def store(self, datasets: Sequence[pydicom.Dataset]) -> list[str]:
        """STOW-RS the datasets as one request, then check by QIDO that each one is there (some archives
        answer success and drop what their filters refuse). Their SOP Instance UIDs; PacsError otherwise."""
        with quiet():
            answer = self._call("storing results", self._web.store_instances, list(datasets))
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        advice = ("Ask its administrator whether it accepts DICOM SR and secondary-capture objects from this "
                  "application.")
        if failed:
            reasons = ", ".join(sorted({str(item.get("FailureReason", "?")) for item in failed}))
            raise PacsError(f"The PACS at {self.settings.host} refused {len(failed)} of {len(datasets)} object(s) "
                            f"(failure reason {reasons}). {advice}")
        uids = [str(ds.SOPInstanceUID) for ds in datasets]
        found: set[str] = set()
        for study_uid in {str(ds.StudyInstanceUID) for ds in datasets}:
            found |= {i.sop_uid for i in self.instances(study_uid)}
        missing = [uid for uid in uids if uid not in found]
        if missing:
            raise PacsError(f"The PACS at {self.settings.host} did not keep {len(missing)} of {len(datasets)} "
                            f"object(s) it was sent (it refused them). {advice}")
        return uids


def to_bytes(ds: pydicom.Dataset) -> bytes:
    """A dataset as DICOM Part 10 bytes (preamble, file meta), written to memory."""
    buffer = io.BytesIO()
    with quiet():
        ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
