"""The exception types cxr_core raises for bad input.

Every failure to read an image ends as ``UnreadableImageError``; every problem with a
model folder (missing card, tampered weights) ends as ``ModelCardError``. Both carry a
message written for a clinician: what was wrong and what to do about it.
"""

import re

# For a failure nobody foresaw (a bug, an engine error): no details, which could carry file contents.
UNEXPECTED = ("This file could not be processed (unexpected {kind}). "
              "Export it again and retry, or report the file if it keeps failing.")

_UNSAFE = re.compile(r"[^A-Za-z0-9 .,+\-_/]")


def quoted(value: object, limit: int = 40) -> str:
    """A value read from the file, fit to quote in a message: at most ``limit`` characters, and only letters,
    digits, spaces and ``.,+-_/`` (any other character becomes ``?``), so that a crafted tag cannot put a link,
    an image or other Markdown into a page that shows the message."""
    return _UNSAFE.sub("?", str(value)[:limit])


class UnreadableImageError(ValueError):
    """The input could not be read as an image. ``str(err)`` says why and what to do."""


class ModelCardError(ValueError):
    """A model folder is missing, incomplete or does not match its card."""
