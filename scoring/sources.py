"""What to score: a folder, a CSV/Parquet manifest, or another registered source kind; and reading one file.

    entries = list_entries("films/")                 # every image file below, sorted
    entries = list_entries("archive.parquet")        # its `path` column, in row order
    data = read_bytes(entries[0].path)               # bytes, or SourceError with a clear message

A source kind is a ``SourceKind`` (does this SOURCE look like mine, and its entries) in ``KINDS``;
a reader is a function from a path or URL to bytes in ``READERS``, chosen by the URL scheme. A
DICOMweb search (QIDO-RS to entries whose paths are WADO-RS URLs) plugs in as one more kind plus a
reader for its scheme, once ``cxr_core`` has the client. Readers run wherever the file is read
(on every Ray worker), so they must not depend on state of the process that listed the entries.
"""

from __future__ import annotations

import os
import re
import stat
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cxr_core import limits
from cxr_core.csvsafe import safe_text
from cxr_core.imaging import is_image_name

MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
URL_TIMEOUT_S = 60.0


class SourceError(Exception):
    """A file that could not be fetched (missing, no permission, unreachable URL); the message says what to do."""


@dataclass(frozen=True)
class Entry:
    """One input row: ``path`` as read (absolute path or URL), ``file`` as shown, ``problem`` if not scorable."""

    path: str
    file: str
    problem: str | None = None
    unlisted: bool = False  # a folder that could not be listed (``path`` ends in "/"): its files are not known


@dataclass(frozen=True)
class SourceKind:
    name: str
    matches: Callable[[str], bool]
    entries: Callable[[str], list[Entry]]


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _folder_entry(path: Path, folder: Path) -> Entry:
    shown = path.relative_to(folder).as_posix()
    if safe_text(str(path)) == str(path):
        return Entry(str(path), shown)
    # Bytes that are not UTF-8 cannot go into the output's text columns (nor through Arrow to the workers).
    return Entry(safe_text(str(path)), safe_text(shown), "The file name is not valid UTF-8 (the undecodable bytes are "
                 "shown as \ufffd), so it cannot be written to the output: rename the file and score it again.")


_LOOSE_LINK = ("This is a symbolic link that leads nowhere (what it points to is missing, or the links loop), so "
               "there is nothing to score here: fix the link or remove it.")
_UNLISTED = ("This folder could not be listed ({why}), so none of its files were scored: give this account read "
             "access to it and run again (with --resume).")


def _walk(folder: Path) -> tuple[list[tuple[Path, str | None]], list[tuple[Path, OSError]]]:
    """The possible image files below ``folder`` (each with a problem or None), and the folders that could not be
    listed. Symbolic links are followed wherever they lead (the archive's owner runs this over their own archive;
    an archive is often a tree of links into storage volumes): a link to a file is that file, a link to a folder
    is searched like one, except a link back to a folder above it (a loop: its files are listed already). A link
    that leads nowhere, under an image file's name, is an entry with its problem, not left out unsaid."""
    files: list[tuple[Path, str | None]] = []
    unlisted: list[tuple[Path, OSError]] = []
    pending = [(folder, frozenset({folder}))]  # a folder, and the real paths of it and the folders above it
    while pending:
        current, above = pending.pop()
        try:
            with os.scandir(current) as listing:
                items = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            unlisted.append((current, exc))
            continue
        current_real = current.resolve()
        subfolders = []
        for item in items:
            if item.name.startswith("."):
                continue
            path = Path(item.path)
            try:
                is_dir = item.is_dir()  # through a link: what it points to
            except OSError:
                is_dir = False
            if item.is_symlink():
                try:
                    real = path.resolve(strict=True)
                except (OSError, RuntimeError):  # a missing target, a loop of links
                    if is_image_name(item.name):
                        files.append((path, _LOOSE_LINK))
                    continue
            else:
                real = current_real / item.name
            if is_dir:
                if real not in above:
                    subfolders.append((path, above | {real}))
            elif is_image_name(item.name):  # a pipe or device under such a name: its reader says what it is
                files.append((path, None))
        pending.extend(reversed(subfolders))
    return sorted(files), unlisted


def folder_entries(source: str) -> list[Entry]:
    """Every image file below ``source`` (recursive, sorted, symbolic links followed), shown relative to it; a
    subfolder that cannot be listed, or a link that leads nowhere, is an entry with a problem (an error row), not
    left out unsaid. A SOURCE that cannot itself be listed is refused (ValueError): one error row for it would
    replace the whole earlier output."""
    folder = Path(source).resolve(strict=True)
    found, unlisted = _walk(folder)
    if unlisted and unlisted[0][0] == folder:
        exc = unlisted[0][1]
        raise ValueError(f"the folder {source} could not be listed ({exc.strerror or exc}); give this account read "
                         "access to it (or mount it) and run again; nothing was scored and the output was left as "
                         "it was")
    entries = []
    for path, problem in found:
        entry = _folder_entry(path, folder)
        entries.append(Entry(entry.path, entry.file, problem) if problem and not entry.problem else entry)
    for sub, exc in unlisted:
        shown = safe_text(sub.relative_to(folder).as_posix() + "/")
        entries.append(Entry(safe_text(str(sub)) + "/", shown, _UNLISTED.format(why=exc.strerror or exc),
                             unlisted=True))
    return entries


def _is_csv(source: str) -> bool:
    return _QUERY.sub("", source).lower().endswith(".csv")  # a URL's query (?download=1) is not its name


def _read_manifest(source: str) -> pd.DataFrame:
    """The manifest as a table; ValueError naming the manifest and what to fix when it cannot be read (its
    content is never quoted: a manifest's rows are file names, which can carry patients' names)."""
    shown = shown_source(source)
    kind = "CSV" if _is_csv(source) else "Parquet"
    if not is_url(source):
        local = Path(source.removeprefix("file://"))
        if not local.exists():
            raise ValueError(f"the manifest {shown} does not exist; check the path (a folder to score must exist, "
                             f"a manifest must be a {kind} file)")
        if not local.is_file():
            raise ValueError(f"the manifest {shown} is not a regular file (a device, pipe or socket); give a "
                             f"{kind} file with a 'path' column, or a folder")
    try:
        if kind == "CSV":
            # Bytes that are not UTF-8 are kept (as surrogates) so that only their rows fail, with a message.
            return pd.read_csv(source, dtype=str, keep_default_na=False, encoding_errors="surrogateescape")
        return pd.read_parquet(source)
    except pd.errors.EmptyDataError:
        raise ValueError(f"the manifest {shown} is empty; its first line must be a header with a 'path' column, "
                         "then one file path or URL per line") from None
    except pd.errors.ParserError as exc:  # pandas names the line and the fields it expected, not their text
        raise ValueError(f"the manifest {shown} is not a well-formed CSV file ({exc}); fix that line (a path with "
                         "a comma in it goes between double quotes)") from None
    except ImportError:
        raise
    except PermissionError:
        raise ValueError(f"the manifest {shown} cannot be read (no permission); give this account read access "
                         "to it") from None
    except OSError as exc:  # a URL that cannot be fetched, a read error
        code = getattr(exc, "code", None)
        why = f"HTTP {code}" if isinstance(code, int) else getattr(exc, "reason", None) or exc.strerror
        why = why or type(exc).__name__
        raise ValueError(f"the manifest {shown} could not be read ({why}); check the path or URL, and that this "
                         "machine can reach it") from None
    except Exception as exc:  # not a Parquet file, a truncated one, a storage driver's error
        raise ValueError(f"the manifest {shown} could not be read as a {kind} file ({type(exc).__name__}); check "
                         f"the path or URL, and that it is a whole {kind} file (names ending in .csv are read as "
                         "CSV, other manifests as Parquet)") from None


# A user name or password before the host (``scheme://user:password@host/...``), found even in a URL that
# urllib cannot parse (it would give its own error, quoting the URL).
_USERINFO = re.compile(r"^([a-z][a-z0-9+.-]*://)[^/?#]*@", re.IGNORECASE)


# Query parameters that carry a credential: pre-signed S3 / GCS / CloudFront URLs, Azure SAS, tokens and keys.
# Compared with '-' read as '_' (api-key and api_key alike).
_SECRET_PARAMS = {name.replace("-", "_") for name in (
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "x-goog-signature", "x-goog-credential",
    "signature", "sig", "token", "access_token", "id_token", "refresh_token", "session_token", "security_token",
    "api_key", "apikey", "x-api-key", "key-pair-id", "awsaccesskeyid", "aws_secret_access_key", "access_key",
    "secret_key", "secret", "client_secret", "private_key", "password", "passwd", "pwd", "auth", "authorization",
    "credential", "credentials", "policy")}
_QUERY = re.compile(r"[?#].*$", re.DOTALL)


def _has_credentials(url: str) -> bool:
    """A user name or password before the host, or a signature, token or key in the query."""
    if _USERINFO.match(url):
        return True
    query = url.split("?", 1)[1].split("#", 1)[0] if "?" in url else ""
    names = {part.split("=", 1)[0].strip().lower() for part in query.split("&") if part}
    return bool({urllib.parse.unquote(n).replace("-", "_") for n in names} & _SECRET_PARAMS)


def _without_credentials(url: str) -> str:
    """``url`` fit to show: its user information and its whole query removed."""
    return _QUERY.sub("", _USERINFO.sub(r"\1", url, count=1))


def shown_source(source: str) -> str:
    """A SOURCE fit for a message: as given, a URL without its user information and query."""
    return _without_credentials(source) if is_url(source) else source


def _missing(value: object) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and value != value)


def _kind_of(value: object) -> str:
    """What a value of a non-text 'path' column is, in words (never the value: it may be patient data)."""
    if isinstance(value, bool):
        return "true/false values"
    if isinstance(value, int | float) or (type(value).__module__ == "numpy" and getattr(value, "ndim", 1) == 0):
        return "numbers"
    if isinstance(value, list | tuple) or (hasattr(value, "__len__") and type(value).__module__ == "numpy"):
        return "lists"
    if isinstance(value, dict):
        return "records (structs)"
    return f"{type(value).__name__} values"


def _header_hint(names: list[str]) -> str:
    """Why a header that looks meant to name 'path' does not (without quoting it: it may be a file name)."""
    text = ",".join(names)
    if "\x00" in text or text.startswith(("\udcff\udcfe", "\udcfe\udcff")):
        return ". It looks saved as UTF-16: save it as UTF-8 (CSV UTF-8 in a spreadsheet)"
    if any(n.strip().strip('"').lower() == "path" for n in names):
        return ". A column is named 'path' with spaces, quotes or capitals around it: name it exactly path"
    if len(names) == 1 and (";" in text or "\t" in text):
        return f". It looks separated by {'semicolons' if ';' in text else 'tabs'}: save it separated by commas"
    return ""


def manifest_entries(source: str) -> list[Entry]:
    """The ``path`` column in row order; relative paths are relative to the manifest's folder (a manifest
    read from a URL: to that URL's folder, so that every worker reads the file beside the manifest, not a
    file of the same name in its own working folder).

    An empty path or a path already listed becomes an entry with a ``problem`` (an error row, not scored).
    """
    if is_url(source) and _has_credentials(source):
        # Relative rows would inherit them, and every row's path and the log would carry them.
        raise ValueError(f"the manifest URL {_without_credentials(source)} carries credentials (a user name or "
                         "password, or a signature, token or key in its query), which would be written to every "
                         "row's path and to the log; give credentials to the workers "
                         "another way (environment, .netrc, the storage's own config)")
    table = _read_manifest(source)
    if "path" not in table.columns:
        # Not its column names: a manifest without a header has its first row (file names) there.
        raise ValueError(f"the manifest {shown_source(source)} has no 'path' column (it has {len(table.columns)} "
                         f"column{'s' if len(table.columns) != 1 else ''}, none named 'path'); its first line must "
                         "be a header naming the columns, one of them 'path', with a file path or URL per row"
                         + _header_hint([str(c) for c in table.columns]))
    values = table["path"].tolist()
    others = sorted({_kind_of(v) for v in values if not _missing(v) and not isinstance(v, str | bytes)})
    if others:
        raise ValueError(f"the manifest {shown_source(source)} has a 'path' column of {' and '.join(others)}, not "
                         "text; write each row's file path or URL as text (a string column)")
    base = None if is_url(source) else Path(source.removeprefix("file://")).resolve().parent
    entries: list[Entry] = []
    first_row: dict[str, int] = {}
    for row, value in enumerate(values, start=1):
        if isinstance(value, bytes):  # a binary column: undecodable bytes are kept, so that the check below says so
            value = value.decode("utf-8", "surrogateescape")
        text = "" if _missing(value) else value.strip()
        if not text:
            entries.append(Entry("", "", f"manifest row {row} has no path; give a file path or URL"))
            continue
        if safe_text(text) != text:
            shown = safe_text(text)
            entries.append(Entry(shown, shown, f"manifest row {row}: the path is not valid UTF-8 (the undecodable "
                                               "bytes are shown as \ufffd), so it cannot be written to the output; "
                                               "write the manifest as UTF-8"))
            continue
        path = text
        if base is not None and not is_url(text):
            local = Path(text.removeprefix("file://"))
            path = str(local if local.is_absolute() else base / local)
        elif base is None and not is_url(text) and not text.startswith(("/", "file://")):
            path = _beside_url(source, text)
        if is_url(path) and _has_credentials(path):  # a relative row of a URL manifest is a URL too, query and all
            entries.append(Entry(_without_credentials(path), _without_credentials(text),
                                 f"manifest row {row}: the URL carries credentials (a user name or password, or a "
                                 "signature, token or key in its query), which would be written to the output; give "
                                 "credentials to the workers another way (environment, .netrc, the storage's own "
                                 "config)"))
            continue
        if path in first_row:
            entries.append(Entry(path, text, f"duplicate of manifest row {first_row[path]} (the same path); "
                                             "scored once, at that row"))
            continue
        first_row[path] = row
        entries.append(Entry(path, text))
    return entries


def _beside_url(manifest_url: str, relative: str) -> str:
    """``relative`` resolved against the folder of ``manifest_url`` (http(s): as a browser would, ``..``
    included; other schemes such as s3://: appended to the manifest's folder)."""
    if manifest_url.split("://", 1)[0].lower() in ("http", "https"):
        return urllib.parse.urljoin(manifest_url, relative)
    return manifest_url[: manifest_url.rfind("/") + 1] + relative


def _dicomweb_entries(source: str) -> list[Entry]:
    raise ValueError("DICOMweb sources are not wired to scoring yet (the app's PACS page reads DICOMweb); "
                     "export the films (or a manifest of their paths) and score those")


KINDS: list[SourceKind] = [
    SourceKind("dicomweb", lambda s: s.startswith(("dicomweb+http://", "dicomweb+https://")), _dicomweb_entries),
    # A folder named like a manifest (scans.csv/) is a folder.
    SourceKind("manifest", lambda s: _QUERY.sub("", s).lower().endswith(MANIFEST_SUFFIXES)
               and (is_url(s) or not Path(s.removeprefix("file://")).is_dir()), manifest_entries),
    SourceKind("folder", lambda s: not is_url(s) and Path(s).is_dir(), folder_entries),
]


def list_entries(source: str) -> list[Entry]:
    """The entries of the first kind in ``KINDS`` that matches ``source``; ValueError if none does."""
    for kind in KINDS:
        if kind.matches(source):
            return kind.entries(source)
    if not is_url(source) and not Path(source.removeprefix("file://")).exists():
        raise ValueError(f"'{shown_source(source)}' does not exist: check the path (a folder of films, or a "
                         f"CSV/Parquet manifest whose name ends in {', '.join(MANIFEST_SUFFIXES)})")
    raise ValueError(f"'{shown_source(source)}' is neither a folder nor a "
                     "CSV/Parquet manifest with a 'path' column "
                     f"(manifest names end in {', '.join(MANIFEST_SUFFIXES)})")


def _capped(fh, declared: int | None = None) -> bytes:
    """At most ``limits.MAX_FILE_BYTES`` from ``fh``; SourceError for more (read no further than one byte
    past the limit: a huge file or an endless body must not fill a worker's memory before it is refused)."""
    if declared is not None and declared > limits.MAX_FILE_BYTES:
        raise SourceError(limits.file_too_large(declared, at_least=True))
    data = fh.read(limits.MAX_FILE_BYTES + 1)
    if len(data) > limits.MAX_FILE_BYTES:
        raise SourceError(limits.file_too_large(len(data), at_least=True))
    return data


def _read_local(path: str) -> bytes:
    try:
        # Non-blocking, so that a FIFO listed in a manifest opens at once instead of waiting for a writer
        # for ever; anything but a regular file is refused below (as cxr_core.imaging does).
        fd = os.open(path.removeprefix("file://"), os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as fh:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise IsADirectoryError
            if not stat.S_ISREG(info.st_mode):
                raise SourceError(f"{path} is not a regular file (a device, pipe or socket), so it cannot be an "
                                  "image; list image files only.")
            return _capped(fh, info.st_size)
    except FileNotFoundError:
        # The same name spelt in the other Unicode form: a manifest written with composed accents (NFC) for files
        # copied from macOS, whose names keep them decomposed (NFD), or the other way round.
        local = path.removeprefix("file://")
        for form in ("NFC", "NFD"):
            other = unicodedata.normalize(form, local)
            if other != local and os.path.isfile(other):
                return _read_local(other)
        raise SourceError(f"File not found: {path}. Check the path, or whether the file was moved.") from None
    except IsADirectoryError:
        raise SourceError(f"{path} is a folder, not a file; list the files in it instead.") from None
    except PermissionError:
        raise SourceError(f"No permission to read {path}; give this account (every worker's) read access.") from None
    except OSError as exc:
        raise SourceError(f"Could not read {path} ({exc.strerror or exc}).") from None


def _read_http(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length", "")
            return _capped(response, int(length) if length.isdigit() else None)
    except urllib.error.HTTPError as exc:
        raise SourceError(f"Could not read {url}: the server answered HTTP {exc.code} ({exc.reason}). "
                          "Check the URL and that the file is still there.") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SourceError(f"Could not read {url}: {reason}. Check the URL and that every worker can reach "
                          "the server.") from None


def _read_fsspec(url: str) -> bytes:
    import fsspec

    try:
        with fsspec.open(url, "rb") as fh:
            size = getattr(fh, "size", None)
            return _capped(fh, size if isinstance(size, int) else None)
    except SourceError:
        raise
    except FileNotFoundError:
        raise SourceError(f"File not found: {url}. Check the URL, or whether the file was moved.") from None
    except ImportError as exc:
        raise SourceError(f"Could not read {url}: this machine lacks the fsspec driver for it ({exc}).") from None
    except Exception as exc:  # any backend's failure (network, auth, unknown protocol) is this file's error
        raise SourceError(f"Could not read {url} ({exc.__class__.__name__}: {exc}). Check the URL and that "
                          "every worker can reach it.") from None


READERS: dict[str, Callable[[str], bytes]] = {"http": _read_http, "https": _read_http}


def read_bytes(path: str) -> bytes:
    """The content of a local path or URL; raises SourceError (never another exception) when it cannot."""
    try:
        if not is_url(path):
            return _read_local(path)
        scheme = path.split("://", 1)[0].lower()
        return READERS.get(scheme, _read_fsspec)(path)
    except SourceError:
        raise
    except Exception as exc:  # a malformed path or URL (a NUL byte, "http://[::1/x", a space), a truncated body
        raise SourceError(f"Could not read {path} ({type(exc).__name__}: {exc}). Check the path or URL.") from None
