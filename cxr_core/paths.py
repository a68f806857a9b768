"""Server-side folders under one configured root: resolve user paths safely, list images.

The app lets a user name a folder on the server (batch review, evaluate on a folder). Only
folders under the configured root may be read: ``..``, absolute paths elsewhere and
symlinks that lead outside are refused with a ValueError saying what is allowed.
"""

from __future__ import annotations

import os
from pathlib import Path

from cxr_core.imaging import is_image_name

DEFAULT_LIMIT = 5000


def _refusal(root: Path, user_path: str, why: str) -> ValueError:
    return ValueError(
        f"'{user_path}' {why}. Only folders inside the configured data root ({root}) can be used: "
        "give a path relative to it, such as 'kermany/train/NORMAL'."
    )


def is_inside(root: Path, path: Path) -> bool:
    """Whether the already-resolved ``path`` is ``root`` itself or lies below it."""
    return path == root or root in path.parents


def resolve_under(root: Path, user_path: str) -> Path:
    """The real path of ``user_path`` (relative to ``root``, or absolute inside it).

    Symlinks are resolved (``Path.resolve(strict=True)``) before the check, so a link
    inside the root that points outside is refused like ``..`` is. Raises ValueError
    when the path leaves the root or does not exist.
    """
    real_root = Path(root).resolve(strict=True)
    text = (user_path or "").strip()
    if "\x00" in text:
        raise _refusal(real_root, text.replace("\x00", "\\0"), "contains a NUL character")
    candidate = Path(text) if text else Path(".")
    if not candidate.is_absolute():
        candidate = real_root / candidate
    else:  # written through the root as configured (a symlink such as /data -> /mnt/data): rebased onto its real path
        given_root = Path(os.path.abspath(root))
        if given_root != real_root and is_inside(given_root, Path(os.path.normpath(candidate))):
            candidate = real_root / Path(os.path.normpath(candidate)).relative_to(given_root)
    # Outside the root as written: one answer whether or not it exists, so that nobody can probe the server's
    # other folders (/etc/passwd and /etc/nope get the same message).
    if not is_inside(real_root, Path(os.path.normpath(candidate))):
        raise _refusal(real_root, text, "is outside the data root")
    try:
        real = candidate.resolve(strict=True)
    except FileNotFoundError:
        # Through a link that leads outside, a missing path gets the same answer as an existing one, so that
        # nobody can probe for files beyond the link.
        if not is_inside(real_root, candidate.resolve(strict=False)):
            raise _refusal(real_root, text, "is outside the data root (through a symlink)") from None
        raise _refusal(real_root, text, "does not exist") from None
    except (OSError, RuntimeError) as exc:  # symlink loops, permission errors
        raise _refusal(real_root, text, f"cannot be resolved ({exc.__class__.__name__})") from None
    if not is_inside(real_root, real):
        raise _refusal(real_root, text, "is outside the data root (through a symlink)")
    return real


def list_images(folder: Path, recursive: bool = True, limit: int = DEFAULT_LIMIT,
                root: Path | None = None, unreadable: list[tuple[Path, OSError]] | None = None) -> list[Path]:
    """Image files (by name; extension-less files count as possible DICOM) under ``folder``, sorted.

    Symlinks whose target lies outside ``root`` (default: ``folder``) are skipped, files
    and directories alike; hidden files are skipped. At most ``limit`` paths are returned.
    Folders that cannot be listed are skipped; ``unreadable`` (if given) gets each with its error.
    """
    real_folder = Path(folder).resolve(strict=True)
    real_root = Path(root).resolve(strict=True) if root is not None else real_folder
    found: list[Path] = []
    pending = [real_folder]
    seen: set[Path] = set()
    while pending and len(found) < limit:
        current = pending.pop()
        if current.resolve() in seen:  # a symlink back up the tree would loop forever
            continue
        seen.add(current.resolve())
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError as exc:
            if unreadable is not None:
                unreadable.append((current, exc))
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if entry.is_symlink():
                try:
                    target = path.resolve(strict=True)
                except (OSError, RuntimeError):
                    continue
                if not is_inside(real_root, target):
                    continue
            if entry.is_dir():
                if recursive:
                    subdirs.append(path)
            elif entry.is_file() and is_image_name(entry.name):
                found.append(path)
        pending.extend(reversed(subdirs))
    return sorted(found)[:limit]


def subfolders(root: Path, limit: int = 500) -> list[str]:
    """Relative paths of the directories under ``root`` (depth-first, sorted), for a folder picker."""
    real_root = Path(root).resolve(strict=True)
    result: list[str] = []
    for dirpath, dirnames, _ in os.walk(real_root):
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and not os.path.islink(os.path.join(dirpath, d))
        )
        for name in dirnames:
            result.append(str((Path(dirpath) / name).relative_to(real_root)))
            if len(result) >= limit:
                return result
    return result


_SPLIT_FOLDERS = {"train", "training", "val", "valid", "validation", "test", "testing"}


def source_of(folder: Path) -> str:
    """A dataset folder's source name as training records it: its name, or its parent's for train/val/test."""
    folder = Path(folder)
    return folder.parent.name if folder.name.lower() in _SPLIT_FOLDERS else folder.name


def locate(rel: str, source: str | None, roots: list[Path]) -> Path | None:
    """The file that a split/predictions row names (``rel`` relative to its source folder), or None.

    Each root is tried as the source folder itself (when its source name matches), as a folder
    holding ``source/`` (and ``source/<split>/``), and as the file's direct parent tree. Only
    files that resolve inside the root they were found under are returned.
    """
    candidates: list[tuple[Path, str]] = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        if source and source_of(root.resolve()) == source:
            candidates.append((root, rel))
        if source:
            candidates.append((root, f"{source}/{rel}"))
            candidates.extend((root, f"{source}/{split}/{rel}") for split in sorted(_SPLIT_FOLDERS))
        candidates.append((root, rel))
    for root, user_path in candidates:
        try:
            path = resolve_under(root, user_path)
        except ValueError:
            continue
        if path.is_file():
            return path
    return None


def escaping_links(folder: Path, root: Path, limit: int = 20) -> list[Path]:
    """Symlinks under ``folder`` (files or directories, any depth) whose target lies outside ``root``.

    For readers that follow links themselves (e.g. the training package's folder scan): a
    folder with such links must be refused, or files outside the root would be read.
    """
    real_root = Path(root).resolve(strict=True)
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(Path(folder).resolve(strict=True)):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            if path.is_symlink():
                try:
                    target = path.resolve(strict=True)
                except (OSError, RuntimeError):
                    continue
                if not is_inside(real_root, target):
                    found.append(path)
                    if len(found) >= limit:
                        return found
    return found
