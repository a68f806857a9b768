"""CSV that is safe to open in a spreadsheet, whatever the file names in it.

A cell that begins with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is read by Excel,
LibreOffice and Google Sheets as a formula (OWASP "CSV injection"): a file named
``=HYPERLINK(...).jpeg`` would become a live link in the clinician's sheet. Such text cells are
written with a leading apostrophe, which spreadsheets show as text; ``restore`` undoes it for
programs that read the CSV back. Numbers are written as numbers (a negative number is not text).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
_FULL_WIDTH = str.maketrans("\uff1d\uff0b\uff0d\uff20", "=+-@")  # ＝ ＋ － ＠


def safe_text(text: str) -> str:
    """``text`` as valid Unicode: undecodable bytes (surrogate escapes from a non-UTF-8 file name) and lone
    surrogates of any other kind become U+FFFD."""
    if not isinstance(text, str):
        return text
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a lone surrogate outside surrogateescape's U+DC80..U+DCFF
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def neutralise(value: Any) -> Any:
    """A text value made inert for spreadsheets (apostrophe before a formula trigger); other values unchanged.

    Undecodable bytes are kept (for CSV files a program reads back, written with ``surrogateescape``).
    """
    if not isinstance(value, str):
        return value
    # Text already quoted like this ("'=x") gets one more apostrophe, so that ``restore`` gives it back exactly.
    return "'" + value if _triggers(value.lstrip("'")) else value


def _triggers(text: str) -> bool:
    """Whether a spreadsheet may read ``text`` as a formula: a trigger first, also behind spaces (some importers
    trim them) or as a full-width sign (some read it as ASCII)."""
    return text.startswith(TRIGGERS) or text.lstrip(" \u3000").translate(_FULL_WIDTH).startswith(TRIGGERS)


def cell(value: Any) -> Any:
    """``neutralise`` of the text as valid Unicode (``safe_text``): for CSV files people open."""
    return neutralise(safe_text(value)) if isinstance(value, str) else value


def restore(value: Any) -> Any:
    """The text ``cell`` was given: the apostrophe it added is removed."""
    if isinstance(value, str) and value.startswith("'") and _triggers(value.lstrip("'")):
        return value[1:]
    return value


def frame(table: pd.DataFrame, *, keep_bytes: bool = False) -> pd.DataFrame:
    """A copy of ``table`` with every text cell (and column name) made safe by ``cell`` (``neutralise`` when
    ``keep_bytes``, so that file paths read back byte for byte)."""
    make_safe = neutralise if keep_bytes else cell
    out = table.copy()
    for column in out.columns:
        if out[column].dtype == object or pd.api.types.is_string_dtype(out[column]):
            out[column] = out[column].map(make_safe)
    out.columns = [make_safe(c) for c in out.columns]
    return out


def to_csv(table: pd.DataFrame, path: Any = None, *, keep_bytes: bool = False, **kwargs: Any) -> str | None:
    """``DataFrame.to_csv`` of the safe ``frame``: CSV text when ``path`` is None, else written to ``path``.

    Lines end in CRLF (RFC 4180), which also makes the writer quote any cell holding a lone CR or LF: a
    name like ``"x\r=cmd"`` stays one cell instead of starting a new row with a formula. ``keep_bytes``
    writes undecodable file-name bytes as they are (for files that ``read_csv`` reads back).
    """
    kwargs.setdefault("lineterminator", "\r\n")
    if keep_bytes and path is not None:
        kwargs.setdefault("errors", "surrogateescape")
    return frame(table, keep_bytes=keep_bytes).to_csv(path, **kwargs)


def read_csv(path: Any, **kwargs: Any) -> pd.DataFrame:
    """A CSV written by ``to_csv`` (or by hand) as a DataFrame with the text ``to_csv`` was given."""
    # round_trip: floats come back bit for bit (the default parser is off by an ulp for 4 in 10 probabilities,
    # which flips a decision at a threshold fitted to one of them).
    kwargs.setdefault("float_precision", "round_trip")
    table = pd.read_csv(path, encoding_errors="surrogateescape", **kwargs)
    for column in table.columns:
        if table[column].dtype == object:
            table[column] = table[column].map(restore)
    table.columns = [restore(c) for c in table.columns]
    return table


def row(values: dict[str, Any], *, keep_bytes: bool = False) -> dict[str, Any]:
    """A ``csv.DictWriter`` row with every text value made safe (see ``frame``)."""
    make_safe = neutralise if keep_bytes else cell
    return {key: make_safe(value) for key, value in values.items()}
