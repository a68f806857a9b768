"""The exception types cxr_core raises for bad input.

Every failure to read an image ends as ``UnreadableImageError``; every problem with a
model folder (missing card, tampered weights) ends as ``ModelCardError``. Both carry a
message written for a clinician: what was wrong and what to do about it.
"""

import re

# For a failure nobody foresaw (a bug, an engine error): no details, which could carry file contents.
UNEXPECTED = ("This file could not be processed (unexpected {kind}). "
              "Export it again and retry, or report the file if it keeps failing.")

TOO_LARGE_FOR_MEMORY = "The image is too large to load in the available memory. Export a smaller image and retry."
UNEXPECTED_READ = "The image could not be read (unexpected {kind}). "
NO_DECODER = ("This computer has no decoder for this DICOM's compression ({syntax}): its decoder packages "
              "(pylibjpeg and its plugins in requirements.txt) are missing. Install them, or re-export the image "
              "uncompressed, and retry.")

# Failures that may be this machine's rather than the file's (memory, a decoder missing on this node, a bug):
# a batch run keeps such a file "to do", so that a rerun elsewhere or after a fix tries it again.
_MACHINE = tuple(m.split("{")[0] for m in (TOO_LARGE_FOR_MEMORY, UNEXPECTED_READ, UNEXPECTED, NO_DECODER))


def depends_on_machine(message: str | None) -> bool:
    """Whether a reading failure's message is one that another machine (or this one, fixed) may not repeat."""
    return bool(message) and message.startswith(_MACHINE)


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
