"""A DICOMweb client for the department's archive (QIDO-RS search, WADO-RS retrieve, STOW-RS store).

    settings = dicomweb.load_settings(secrets.get("pacs"))     # env CXR_PACS_URL... win; None: PACS off
    client = dicomweb.Client(settings)
    studies = client.search_studies(modality="CR", date_from=date(2004, 1, 1))   # .truncated: more than the limit
    data = client.retrieve(client.instances(studies[0].study_uid)[0])   # DICOM Part 10 bytes, in memory

Built on ``dicomweb-client``. Retrieval asks for the stored transfer syntax (``transfer-syntax=*``), so
compressed films come back as stored and are decoded by ``cxr_core.imaging`` like a file from disk; the answer
is read in a bounded stream (``Client.retrieve``), never parsed whole by dicomweb-client.
Every failure ends as ``PacsError`` with a message that says what was wrong and what to do; messages
and ``repr`` never hold the password or token, and nothing read from the PACS is logged or written
to disk. Search results keep only what is needed to choose a study (no patient name or ID).
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pydicom
import requests
import requests.adapters
import urllib3
from dicomweb_client import DICOMwebClient

from cxr_core import imaging, limits

T = TypeVar("T")
ENV = {"url": "CXR_PACS_URL", "username": "CXR_PACS_USER", "password": "CXR_PACS_PASSWORD",
       "token": "CXR_PACS_TOKEN", "verify": "CXR_PACS_VERIFY", "timeout": "CXR_PACS_TIMEOUT",
       "max_instances": "CXR_PACS_MAX_INSTANCES"}  # fmt: skip
RADIOGRAPHY = ("CR", "DX", "DR")
STUDY_FIELDS = ("StudyInstanceUID", "AccessionNumber", "StudyDate", "StudyDescription", "ModalitiesInStudy",
                "NumberOfStudyRelatedInstances")
INSTANCE_FIELDS = ("SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality", "ViewPosition",
                   "BodyPartExamined", "SeriesDescription", "InstanceNumber", "SeriesNumber")
ACCEPT_ANY_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'
# One image's answer must be complete within this many times the timeout (30 s: 5 minutes; a 37 MB film then
# needs 0.13 MB/s).
RETRIEVE_TIMEOUTS = 10
PAGE = 500  # instances asked per QIDO request (an archive may answer fewer: its own page size)
MAX_LISTED = 5000  # instances listed for one study at most
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
    """The PACS could not be used; ``str(err)`` says why and what to do (never a password or token).

    From ``Client.store``: ``sent`` objects were sent and the PACS kept ``stored`` of them (None: unknown, e.g. a
    timeout after it may have stored them), so that a partial write-back is still audited. Both None elsewhere.
    """

    def __init__(self, message: str, *, sent: int | None = None, stored: int | None = None):
        super().__init__(message)
        self.sent, self.stored = sent, stored


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


def _verify(value: Any, setting: str) -> bool | str:
    """The TLS ``verify`` setting: true/false (yes/no, on/off, 1/0), or the path of a CA bundle (a file, or a folder
    of certificates) that must exist: a typo such as ``flase`` would otherwise be taken as a path and fail only at
    the first request, as if the PACS were at fault."""
    if isinstance(value, bool):
        return value
    text = str(value).strip()
    if text.lower() in ("0", "false", "no", "off"):
        return False
    if text.lower() in ("", "1", "true", "yes", "on"):
        return True
    if not os.path.exists(text):
        raise PacsError(f"The PACS setting {setting} is {text!r}: it must be true, false, or the path of an existing "
                        "CA bundle file (a PEM file of the PACS's certificate authority). Fix it and restart the app.")
    return text


def load_settings(section: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
                  ) -> Settings | None:
    """Settings from the CXR_PACS_* environment variables when CXR_PACS_URL is set, else from a secrets ``[pacs]``
    section; None if neither names a URL (the PACS features are then off). The environment wins, as CXR_AUDIT_DIR
    does over ``[audit]``: it is given for this start (``python -m cxr_core.pacs demo``'s line, a service's unit).
    The two are never mixed: one server's password never goes to another's URL. Raises PacsError for settings
    that are present but wrong."""
    environ = os.environ if environ is None else environ
    values = dict(section or {})
    verify_setting = "'verify' in the [pacs] settings"
    if environ.get(ENV["url"]):
        values = {key: environ[name] for key, name in ENV.items() if environ.get(name)}
        verify_setting = ENV["verify"]
    if not values.get("url"):
        return None
    unknown = sorted(set(values) - set(ENV))
    if unknown:
        raise PacsError(f"Unknown PACS setting(s) {', '.join(unknown)}; the known ones are {', '.join(ENV)}.")
    verify = _verify(values.get("verify", True), verify_setting)
    try:
        return Settings(url=str(values["url"]).rstrip("/"), username=values.get("username") or None,
                        password=values.get("password") or None, token=values.get("token") or None,
                        verify=verify, timeout=float(values.get("timeout", 30)),
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
    number: int | None  # InstanceNumber
    series_number: int | None = None  # SeriesNumber: the study's films are taken in series, then instance order

    @property
    def order(self) -> tuple:
        """Sort key: series number, series UID, instance number, SOP UID (numbers missing: after the others)."""
        return (self.series_number is None, self.series_number or 0, self.series_uid, self.number is None,
                self.number or 0, self.sop_uid)


_BULK_VRS = ("OB", "OD", "OF", "OL", "OV", "OW", "UN")


def is_instance(ds: pydicom.Dataset, instance: Instance) -> bool:
    """Whether a dataset the PACS sent is the instance asked for (its study, series and SOP Instance UIDs)."""
    sent = tuple(str(ds.get(k, "")).strip() for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
    return sent == (instance.study_uid, instance.series_uid, instance.sop_uid)


def _check_uids(host: str, instance: Instance) -> None:
    """Refuse to put into a URL UIDs that are not DICOM UIDs (a PACS's answer is not trusted)."""
    if not all(imaging.UID.fullmatch(uid) for uid in (instance.study_uid, instance.series_uid, instance.sop_uid)):
        raise PacsError(f"The PACS at {host} listed an image whose UIDs are not DICOM UIDs, so it cannot be "
                        "retrieved. Ask its administrator.")


# PS3.18 (QIDO-RS): an archive that cuts an answer at its own maximum says so in a Warning header, "299 <service>:
# The number of results exceeded the maximum supported by the server. Additional results can be requested."
# (Orthanc's LimitFindResults cuts without it: set it above the app's largest search limit.)
CAPPED = re.compile(r"\b299\b.*(exceed|additional results)", re.IGNORECASE | re.DOTALL)


class Studies(list):
    """``search_studies``' answer: a list of ``Study``; ``truncated`` when the PACS had more than the limit
    (the list then holds only the first ``limit`` it answered: the user must narrow the search)."""

    truncated: bool = False
    limit: int = 0


def _value(item: Mapping[str, Any], keyword: str) -> str:
    """First value of a DICOM JSON attribute as text; '' when missing or odd (QIDO answers vary)."""
    try:
        attribute = item.get(f"{pydicom.datadict.tag_for_keyword(keyword):08X}")
        values = attribute.get("Value") if isinstance(attribute, Mapping) else None
        if not values:
            return ""
        first = values[0]
        if isinstance(first, Mapping):  # person names come as {"Alphabetic": ...}
            return str(first.get("Alphabetic", "") or "")
        if keyword == "ModalitiesInStudy":
            return "\\".join(str(v) for v in values if v is not None)
        return "" if first is None else str(first)  # an empty value is null in DICOM JSON
    except (AttributeError, TypeError, IndexError):
        return ""


def _items(answer: Any) -> list[Mapping[str, Any]]:
    """The objects of a QIDO answer, which should be a JSON list of them (null, a number or a lone object: none)."""
    return [item for item in answer if isinstance(item, Mapping)] if isinstance(answer, list) else []


def _int(text: str) -> int | None:
    try:
        return int(float(text))
    except (ValueError, OverflowError):
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
                    _value(item, "SeriesDescription"), _int(_value(item, "InstanceNumber")),
                    _int(_value(item, "SeriesNumber")))


def _date_range(start: date | None, end: date | None) -> str | None:
    if start is None and end is None:
        return None
    if start and end and start > end:
        raise PacsError(f"The search starts ({start}) after it ends ({end}). Swap the dates and search again.")
    return f"{start.strftime('%Y%m%d') if start else ''}-{end.strftime('%Y%m%d') if end else ''}"


def _read_some(raw: urllib3.response.BaseHTTPResponse) -> bytes:
    """The next bytes of an answer as they arrive (up to 1 MB; b"" at its end), so that a deadline can be checked
    between them: requests' ``iter_content`` waits for a whole chunk, or for the end of a body without chunks.
    urllib3's errors become requests' ones, which ``Client._call`` turns into messages."""
    try:
        return raw.read1(limits.MiB, decode_content=True)
    except urllib3.exceptions.ReadTimeoutError as exc:
        raise requests.exceptions.ReadTimeout(str(exc)) from exc
    except urllib3.exceptions.HTTPError as exc:  # the connection broke, or a body that does not decode
        raise requests.exceptions.ConnectionError(str(exc)) from exc


class _Received:
    """A streamed answer, read to its end, as dicomweb-client's multipart decoder takes it."""

    def __init__(self, response: requests.Response, body: bytes) -> None:
        self.headers, self.content = response.headers, bytes(body)

    def __enter__(self) -> _Received:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


MAX_ANSWER_BYTES = 64 * limits.MiB  # a search or store answer (JSON, XML): 5000 instances take about 10 MB


class _BoundedAdapter(requests.adapters.HTTPAdapter):
    """Every answer that dicomweb-client reads whole (searches, store answers) is read here in a stream that stops
    at ``MAX_ANSWER_BYTES`` and at a deadline of ``RETRIEVE_TIMEOUTS`` times the timeout: the timeout alone
    bounds each wait for a byte, so a PACS that trickles an answer, or sends gigabytes of JSON, would hold the
    page (and the server's memory, shared by every user) without end. Streamed requests (``retrieve``) pass
    through: they bound themselves."""

    def __init__(self, host: str, timeout: float) -> None:
        super().__init__()
        self.host, self.deadline_s = host, RETRIEVE_TIMEOUTS * timeout
        self._last = threading.local()  # the Warning header of this thread's last answer read whole

    def last_warning(self) -> str:
        """The Warning header of the last answer this thread read whole ('' when it had none)."""
        return getattr(self._last, "warning", "")

    def send(self, request, stream=False, **kwargs):  # noqa: ANN001, ANN201 - requests' signature
        response = super().send(request, stream=True, **kwargs)
        if stream:
            return response
        self._last.warning = str(response.headers.get("Warning") or "")
        with response:  # closed on every way out: read whole, or abandoned
            body = _read_bounded(
                lambda: _read_some(response.raw), MAX_ANSWER_BYTES, time.monotonic() + self.deadline_s,
                f"The PACS at {self.host} sent more than {MAX_ANSWER_BYTES // limits.MiB} MB in answer to one "
                "request: it was not read. Narrow the search, or ask its administrator.",
                f"The PACS at {self.host} took more than {self.deadline_s:g} s to answer one request (it sends too "
                "slowly). Retry later, narrow the search, or raise 'timeout' in the [pacs] settings.")
        response._content, response._content_consumed = body, True
        return response


def _read_bounded(read: Callable[[], bytes], cap: int, deadline: float, too_much: str, too_slow: str) -> bytes:
    """An answer read to its end in pieces (``read`` gives b"" at the end), stopped with PacsError(``too_much``)
    past ``cap`` bytes and PacsError(``too_slow``) past the ``deadline`` (``time.monotonic``)."""
    body = bytearray()
    while chunk := read():
        body += chunk
        if len(body) > cap:
            raise PacsError(too_much)
        if time.monotonic() > deadline:
            raise PacsError(too_slow)
    return bytes(body)


class Client:
    """DICOMweb client for one PACS; every call raises only ``PacsError``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        session = requests.Session()
        session.verify = settings.verify
        session.trust_env = False  # no proxy or .netrc credentials picked up behind the user's back
        bounded = self._adapter = _BoundedAdapter(settings.host, settings.timeout)
        session.mount("http://", bounded)
        session.mount("https://", bounded)
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
                       ) -> Studies:
        """Studies matching all given criteria, newest first; ``modality`` one code or several (any of). At most
        ``limit``: each query asks for one more, and when the PACS has more the answer is marked ``truncated``."""
        filters: dict[str, str] = {}
        if (dates := _date_range(date_from, date_to)) is not None:
            filters["StudyDate"] = dates
        if accession.strip():
            filters["AccessionNumber"] = accession.strip()
        found: dict[str, Study] = {}
        truncated = False
        for code in [modality] if isinstance(modality, str) else list(modality):
            query = {**filters, "ModalitiesInStudy": code} if code else filters
            answer = self._call("searching for studies", self._web.search_for_studies, search_filters=query,
                                fields=list(STUDY_FIELDS), limit=limit + 1)
            answer = answer if isinstance(answer, list) else []
            if len(answer) > limit:  # the PACS has more than the limit: keep its first ``limit``, say so
                truncated, answer = True, answer[:limit]
            elif CAPPED.search(self._adapter.last_warning()):  # it answered fewer: its own maximum (PS3.18)
                truncated = True
            for item in answer:
                study = _study(item) if isinstance(item, Mapping) else None
                if study is not None:
                    found.setdefault(study.study_uid, study)
        if body_part.strip():  # a series attribute: asked per study found, so the query stays bounded
            part = {"BodyPartExamined": body_part.strip().upper()}
            found = {uid: study for uid, study in found.items()
                     if self._call("searching for series by body part", self._web.search_for_series,
                                   study_instance_uid=uid, search_filters=part, fields=["BodyPartExamined"], limit=1)}
        out = Studies(sorted(found.values(), key=lambda s: (s.date, s.accession), reverse=True))
        out.truncated, out.limit = truncated or len(out) > limit, limit  # several modalities: up to limit each
        del out[limit:]
        return out

    def instances(self, study_uid: str, sop_uid: str = "") -> list[Instance]:
        """Every instance of a study (images, reports...), in series and instance order (``Instance.order``: by
        number, not by the text of the UIDs); with ``sop_uid``, only that one (if the PACS has it).

        Asked page by page (``offset``) until a page is empty: an archive that answers at most its own page size
        (some cloud stores: 100) would otherwise hide the study's later films, and make ``store`` report results
        it kept as refused. A server that ignores ``offset`` (the same page again) ends the listing; at most
        ``MAX_LISTED`` instances."""
        filters = {"SOPInstanceUID": sop_uid} if sop_uid else None
        found: dict[str, Instance] = {}
        offset = 0
        while len(found) < MAX_LISTED:
            answer = self._call("listing the study's images", self._web.search_for_instances,
                                study_instance_uid=study_uid, fields=list(INSTANCE_FIELDS), search_filters=filters,
                                limit=PAGE, offset=offset)
            items = _items(answer)
            page = [i for i in (_instance(item, study_uid) for item in items) if i is not None]
            new = [i for i in page if i.sop_uid not in found]
            if not items or (page and not new):
                break
            found.update((i.sop_uid, i) for i in new)
            offset += len(items)
        return sorted(found.values(), key=lambda i: i.order)[:MAX_LISTED]

    def series_descriptions(self, study_uid: str) -> dict[str, str]:
        """Series UID -> description for every series of a study."""
        answer = self._call("listing the study's series", self._web.search_for_series,
                            study_instance_uid=study_uid, fields=["SeriesDescription"])
        return {_value(item, "SeriesInstanceUID"): _value(item, "SeriesDescription")
                for item in _items(answer) if _value(item, "SeriesInstanceUID")}

    def retrieve(self, instance: Instance) -> bytes:
        """One instance as DICOM Part 10 bytes (stored transfer syntax), in memory only.

        Read in a stream that stops at the reader's file limit (``limits.MAX_FILE_BYTES``) and at a deadline of
        ``RETRIEVE_TIMEOUTS`` times the timeout for the whole answer (the timeout alone bounds each wait for a
        byte, so a server that trickles bytes would never be cut off); the bytes then go through
        ``cxr_core.imaging`` and its limits like a file from disk. dicomweb-client would read the whole answer
        and parse it (and inflate a Deflated dataset) without a bound."""
        _check_uids(self.settings.host, instance)
        doing = "retrieving an image"
        url = f"{self.settings.url.rstrip('/')}/studies/{instance.study_uid}/series/{instance.series_uid}" \
              f"/instances/{instance.sop_uid}"
        response = self._call(doing, self._web._http_get, url, headers={"Accept": ACCEPT_ANY_DICOM}, stream=True)
        cap = limits.MAX_FILE_BYTES + 4096  # the film and its multipart headers
        deadline = time.monotonic() + RETRIEVE_TIMEOUTS * self.settings.timeout
        with response:
            declared = _int(str(response.headers.get("Content-Length", "")))
            if declared is not None and declared > cap:
                raise PacsError(f"The PACS at {self.settings.host} is sending an image of {declared / limits.MiB:,.0f} "
                                f"MB, over the limit of {limits.MAX_FILE_BYTES // limits.MiB} MB for one film: it "
                                "was not read. Open it in the PACS viewer.")
            body = _read_bounded(
                lambda: self._call(doing, _read_some, response.raw), cap, deadline,
                f"The PACS at {self.settings.host} sent more than {limits.MAX_FILE_BYTES // limits.MiB} MB for one "
                "image, over the limit for one film: it was not read. Open it in the PACS viewer.",
                f"The PACS at {self.settings.host} took more than {RETRIEVE_TIMEOUTS * self.settings.timeout:g} s to "
                "send one image (it sends too slowly). Retry later, or raise 'timeout' in the [pacs] settings.")
        parts = self._call(doing, lambda: list(self._web._decode_multipart_message(_Received(response, body), False)))
        if len(parts) != 1:
            raise PacsError(f"The PACS at {self.settings.host} answered {len(parts)} objects for one image. Ask its "
                            "administrator.")
        return bytes(parts[0])

    def header(self, instance: Instance) -> pydicom.Dataset:
        """One instance's header from WADO-RS metadata (a few KB, no pixel data), checked to be the instance asked
        for: what written results copy (patient, study), without reading the film (30-60 MB) again. Raises
        PacsError; an archive without the metadata service is read through ``retrieve`` instead (the caller's
        choice)."""
        _check_uids(self.settings.host, instance)
        doing = "reading an image's header"
        answer = self._call(doing, self._web.retrieve_instance_metadata, instance.study_uid, instance.series_uid,
                            instance.sop_uid)
        try:
            with quiet():
                ds = pydicom.Dataset.from_json(answer, bulk_data_uri_handler=lambda *_: None)
                for element in list(ds):  # no pixels (sent only as a link) and no other bulk values
                    if element.tag >= 0x7FE00000 or (element.value is None and element.VR in _BULK_VRS):
                        del ds[element.tag]
                same = is_instance(ds, instance)
        except Exception as exc:  # odd JSON (wrong VRs, broken values)
            raise PacsError(f"The PACS at {self.settings.host} sent an image header that could not be understood "
                            f"({type(exc).__name__}). Ask its administrator, or retry.") from exc
        if not same:
            raise PacsError("The PACS sent the header of another image than the one asked for (its study, series or "
                            "instance UID differs). Ask the PACS administrator to check the archive.")
        return ds

    def retrieve_dataset(self, instance: Instance) -> pydicom.Dataset:
        """One instance parsed whole, pixel data included (reading results back; the app itself reads films
        through ``retrieve`` and ``cxr_core.imaging``)."""
        with quiet():
            return pydicom.dcmread(io.BytesIO(self.retrieve(instance)), force=True)

    def store(self, datasets: Sequence[pydicom.Dataset]) -> list[str]:
        """STOW-RS the datasets as one request, then check by QIDO that each one is there (some archives
        answer success and drop what their filters refuse). Their SOP Instance UIDs; PacsError otherwise, which
        says why the PACS refused (its failure reasons) and, when it kept some, which ones."""
        host, count = self.settings.host, len(datasets)
        advice = ("Ask its administrator whether it accepts DICOM SR and secondary-capture objects from this "
                  "application.")
        try:
            with quiet():
                answer = self._call("storing results", self._web.store_instances, list(datasets))
        except PacsError as err:
            response = getattr(err.__cause__, "response", None)
            if response is None or response.status_code != 409:
                cause = err.__cause__
                if response is not None and 400 <= response.status_code < 500:
                    err.sent, err.stored = count, 0  # refused as a whole (credentials, size, the request)
                elif isinstance(cause, requests.exceptions.ConnectionError) and not isinstance(
                        cause, requests.exceptions.ReadTimeout) and _never_connected(cause):
                    pass  # nothing went out: no write to account for
                else:
                    err.sent, err.stored = count, None  # it may have stored some before it failed: unknown
                raise
            # 409 Conflict: the PACS stored none of them; its answer names a failure reason per object.
            reasons = _failure_reasons(_stow_answer(response).get("FailedSOPSequence"))
            warning = str(response.headers.get("Warning", ""))[:300]
            raise PacsError(f"The PACS at {host} refused all {count} object(s) (HTTP 409 Conflict; "
                            f"{reasons or 'it gave no failure reason'}{'; it says: ' + warning if warning else ''}). "
                            f"Nothing was stored. {advice}", sent=count, stored=0) from err
        answer = answer if isinstance(answer, pydicom.Dataset) else pydicom.Dataset()
        uids = [str(ds.SOPInstanceUID) for ds in datasets]
        failed = answer.get("FailedSOPSequence")
        if failed:  # 202 Accepted: some stored, some refused
            refused = {str(item.get("ReferencedSOPInstanceUID", "")) for item in failed}
            referenced = answer.get("ReferencedSOPSequence")
            if referenced is not None:
                kept = {str(item.get("ReferencedSOPInstanceUID", "")) for item in referenced}
            else:
                kept = set(uids) - refused
            raise PacsError(f"The PACS at {host} refused {len(failed)} of {count} object(s) "
                            f"({_failure_reasons(failed)}). {_stored(datasets, kept)} {advice}",
                            sent=count, stored=len(kept & set(uids)))
        found: set[str] = set()
        try:  # each object asked for by its own UID: a listing of a large study could miss it
            for ds in datasets:
                found |= {i.sop_uid for i in self.instances(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))}
        except PacsError as err:  # the PACS answered success, then its check failed: stored, not confirmed
            err.sent, err.stored = count, None
            raise
        missing = [uid for uid in uids if uid not in found]
        if missing:
            raise PacsError(f"The PACS at {host} did not keep {len(missing)} of {count} object(s) it was sent "
                            f"(it refused them). {_stored(datasets, found)} {advice}",
                            sent=count, stored=count - len(missing))
        return uids


def _never_connected(exc: BaseException) -> bool:
    """Whether a requests ConnectionError failed before a connection was made (refused, no route, name not
    resolved, connect timeout): then nothing of a request was sent."""
    import urllib3.exceptions

    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, urllib3.exceptions.NewConnectionError | urllib3.exceptions.NameResolutionError
                      | ConnectionRefusedError):
            return True
        stack += [e.__cause__, e.__context__, *(a for a in e.args if isinstance(a, BaseException)),
                  getattr(e, "reason", None)]
    return False


# PS3.4 Table B.2-1 and PS3.18 Table 10.5.3-1: the failure reasons a STOW-RS answer gives per refused object.
FAILURE_REASONS = {0x0110: "processing failure", 0x0111: "duplicate SOP instance", 0x0117: "invalid object instance",
                   0x0122: "SOP class not supported", 0x0124: "not authorized", 0x0211: "unrecognized operation",
                   0xA700: "out of resources", 0xA900: "data set does not match its SOP class",
                   0xC000: "cannot understand", 0xC122: "transfer syntax not supported"}  # fmt: skip
FAILURE_RANGES = {0xA7: "out of resources", 0xA9: "data set does not match its SOP class", 0xC0: "cannot understand"}


def _stow_answer(response: requests.Response) -> pydicom.Dataset:
    """The DICOM JSON body of a STOW-RS answer; an empty dataset when it has none or it does not parse."""
    try:
        with quiet():
            return pydicom.Dataset.from_json(response.json())
    except Exception:  # noqa: BLE001 - XML, HTML or nothing: the status code alone must do
        return pydicom.Dataset()


def _failure_reasons(failed: Sequence[pydicom.Dataset] | None) -> str:
    """'failure reason 0xA900 (data set does not match its SOP class) for 2 object(s), ...'; '' when none given."""
    counts: dict[str, int] = {}
    for item in failed or []:
        code = item.get("FailureReason")
        try:
            meaning = FAILURE_REASONS.get(int(code)) or FAILURE_RANGES.get(int(code) >> 8, "unknown reason")
            text = f"0x{int(code):04X} ({meaning})"
        except (TypeError, ValueError):
            text = "not given"
        counts[text] = counts.get(text, 0) + 1
    return ", ".join(f"failure reason {text} for {n} object(s)" for text, n in sorted(counts.items()))


def _stored(datasets: Sequence[pydicom.Dataset], kept: set[str]) -> str:
    """Which of the datasets the PACS kept, by series description and SOP Instance UID (no patient data)."""
    names = [f"{ds.get('SeriesDescription') or ds.get('Modality', 'object')} (SOP Instance UID {ds.SOPInstanceUID})"
             for ds in datasets if str(ds.SOPInstanceUID) in kept]
    if not names:
        return "Nothing was stored."
    return f"It stored {len(names)} of them, now in the study: {'; '.join(names)}."


def to_bytes(ds: pydicom.Dataset) -> bytes:
    """A dataset as DICOM Part 10 bytes (preamble, file meta), written to memory."""
    buffer = io.BytesIO()
    with quiet():
        ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
