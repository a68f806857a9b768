"""The exception types cxr_core raises for bad input.

Every failure to read an image ends as ``UnreadableImageError``; every problem with a
model folder (missing card, tampered weights) ends as ``ModelCardError``. Both carry a
message written for a clinician: what was wrong and what to do about it.
"""


class UnreadableImageError(ValueError):
    """The input could not be read as an image. ``str(err)`` says why and what to do."""


class ModelCardError(ValueError):
    """A model folder is missing, incomplete or does not match its card."""
