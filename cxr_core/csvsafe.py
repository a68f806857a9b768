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


def safe_text(text: str) -> str:
    """``text`` as valid Unicode: undecodable bytes (surrogate escapes from a non-UTF-8 file name) become U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if isinstance(text, str) else text


def cell(value: Any) -> Any:
    """A text value made inert for spreadsheets (apostrophe before a formula trigger); other values unchanged."""
    if not isinstance(value, str):
        return value
    value = safe_text(value)
    # Text already quoted like this ("'=x") gets one more apostrophe, so that ``restore`` gives it back exactly.
    return "'" + value if value.lstrip("'").startswith(TRIGGERS) else value


def restore(value: Any) -> Any:
    """The text ``cell`` was given: the apostrophe it added is removed."""
    if isinstance(value, str) and value.startswith("'") and value.lstrip("'").startswith(TRIGGERS):
        return value[1:]
    return value


def frame(table: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``table`` with every text cell (and column name) made safe by ``cell``."""
    out = table.copy()
    for column in out.columns:
        if out[column].dtype == object or pd.api.types.is_string_dtype(out[column]):
            out[column] = out[column].map(cell)
    out.columns = [cell(c) for c in out.columns]
    return out


def to_csv(table: pd.DataFrame, path: Any = None, **kwargs: Any) -> str | None:
    """``DataFrame.to_csv`` of the safe ``frame``: CSV text when ``path`` is None, else written to ``path``.

    Lines end in CRLF (RFC 4180), which also makes the writer quote any cell holding a lone CR or LF: a
    name like ``"x\r=cmd"`` stays one cell instead of starting a new row with a formula.
    """
    kwargs.setdefault("lineterminator", "\r\n")
    return frame(table).to_csv(path, **kwargs)
