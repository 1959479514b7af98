"""Which files of a folder are videos, and whether their names can be written down.

`vidray index folder` (vidray/data/index.py) and `vidray predict --out` on a folder (vidray/infer/corpus.py)
find a folder's videos the same way (:func:`videos_under`): by extension, hidden entries left out, linked
folders followed once each. A name must also be text: Parquet, CSV and JSON hold UTF-8, and Linux names are
bytes (:func:`is_text_name`, :func:`as_text`, :func:`refuse_names_not_utf8`).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Iterator, NoReturn

from vidray.errors import UserError

# Preference order when one id exists with several extensions.
VIDEO_EXTENSIONS = (
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".flv",
    ".wmv", ".3gp", ".3g2", ".ts", ".mts", ".m2ts", ".ogv", ".vob", ".asf", ".mxf",
)
EXTENSION_RANK = {ext: rank for rank, ext in enumerate(VIDEO_EXTENSIONS)}


def is_video_file(path: Path) -> bool:
    return path.suffix.lower() in EXTENSION_RANK


def is_hidden(name: str) -> bool:
    """A file or folder a folder's owner does not see as data, left out as Hugging Face ``datasets``'
    folder builders leave it out: dot-names (Jupyter's ``.ipynb_checkpoints``, macOS's ``._clip.mp4``
    resource forks and ``.Trashes``) and the ``__MACOSX`` folder of a zip made on a Mac. Seen as a class
    folder, one of them would add a label to the model."""
    return name.startswith(".") or name == "__MACOSX"


def refuse_unlistable(err: OSError) -> NoReturn:
    """``os.walk``'s ``onerror`` for a listing whose videos are data: a folder that cannot be read (no read or
    search permission, an I/O error) stops it with one line naming the folder and the fix. ``os.walk`` alone
    skips such a folder, and its videos would be left out of the index (or of a prediction) without a word."""
    folder = as_text(str(err.filename))
    if isinstance(err, PermissionError):
        raise UserError(
            f"folder {folder} cannot be read (permission denied), so its videos cannot be listed: make it readable "
            f"(`chmod -R a+rX {folder}`, as its owner or with sudo) or move it out of the video folder"
        )
    raise UserError(f"folder {folder} cannot be read ({err.strerror}), so its videos cannot be listed: "
                    "check the disk or mount it is on, or move it out of the video folder")  # fmt: skip


def require_searchable(folder: str | Path) -> None:
    """Raise PermissionError for a folder that can be listed (read permission) but not searched (no execute
    permission): its names are there, yet none of its entries can be opened or even stat'ed."""
    if not os.access(folder, os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))


def entries_of(folder: Path) -> list[Path]:
    """``folder``'s entries, sorted; a folder that cannot be read is refused (:func:`refuse_unlistable`)."""
    try:
        require_searchable(folder)
        return sorted(Path(folder).iterdir())
    except OSError as err:
        refuse_unlistable(err)


def walk_once(folder: str | Path, onerror=None) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk`` into linked folders too, each folder once, under the first path that reaches it (in the
    order the caller leaves in ``folders``, which it may sort or prune in place as with ``os.walk``).
    ``onerror``: as ``os.walk``'s (None: a folder that cannot be read is skipped; :func:`refuse_unlistable`).

    A link back up the tree (``latest -> .``, ``parent -> ..``) would otherwise be followed again and again,
    each time listing the same files under a longer path, which grows without end once two such links meet."""
    seen: set[tuple[int, int]] = set()
    # A link to a folder that holds ``folder`` (``parent -> ..`` in a class folder) is not walked into at all: its
    # other subfolders are other classes' (or other splits'), and their videos would be listed as this one's.
    root = os.path.realpath(folder)
    for directory, folders, files in os.walk(folder, onerror=onerror, followlinks=True):
        try:
            identity = os.stat(directory)
            require_searchable(directory)
        except OSError as err:
            folders[:] = []
            if onerror is not None:
                onerror(err)
            continue
        real = os.path.realpath(directory)
        if (identity.st_dev, identity.st_ino) in seen or (real != root and root.startswith(real.rstrip(os.sep) + os.sep)):
            folders[:] = []
            continue
        seen.add((identity.st_dev, identity.st_ino))
        yield directory, folders, files


def videos_under(folder: str | Path, ignored: list[Path] | None = None) -> list[str]:
    """Every video below ``folder`` (:func:`is_listed_video`), in its subfolders and linked folders too
    (:func:`walk_once`), sorted: what a class folder holds, read as torchvision's ``ImageFolder`` reads one,
    and what a corpus folder holds. Hidden files and folders (:func:`is_hidden`) are left out, and with
    ``ignored`` added to it, as are the other files that are not videos. A folder below ``folder`` that
    cannot be read stops the listing in one line (:func:`refuse_unlistable`): its videos are never left out
    unsaid."""
    videos: list[str] = []
    for directory, folders, files in walk_once(folder, onerror=refuse_unlistable):
        if ignored is not None:
            ignored += [Path(directory, name) for name in sorted(folders) if is_hidden(name)]
        folders[:] = sorted(name for name in folders if not is_hidden(name))  # not walked into; in order
        for name in sorted(files):
            path = Path(directory, name)
            if not is_hidden(name) and is_listed_video(path):
                videos.append(str(path))
            elif ignored is not None:
                ignored.append(path)
    return sorted(videos)


def is_listed_video(path: Path) -> bool:
    """A video file in a folder, or a link named like one whose target is gone. A corpus of links into
    storage that was moved or unmounted must show each such link as a video rejected with its reason
    ("dangling symlink (points to ...)"), not lose it from the count without a word."""
    return is_video_file(path) and (path.is_file() or (path.is_symlink() and not path.exists()))


def is_text_name(path: str) -> bool:
    """Whether ``path`` is valid UTF-8. Linux allows any bytes in a name, and unzipping a Windows archive or
    copying from an old share leaves names in cp1252 or cp437; Python reads them with stand-ins
    (surrogates) that open the file but cannot be written as text: not to Parquet, CSV or JSON records."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def as_text(path: str) -> str:
    """``path`` as records can hold it: each byte of a name that is not UTF-8 shown as ``\\xNN``
    (what Python shows for bytes), the rest as it is."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


# Renames every name under a folder from a legacy encoding to UTF-8 (Debian/Ubuntu: apt install convmv).
RENAME_TO_UTF8 = "convmv -r -f cp1252 -t utf-8 --notest"


def _first_odd_part(relative: str) -> str | None:
    """``relative`` up to its first part that is not UTF-8 (a folder is named once, not again for each video in
    it), or None when every part is."""
    parts = relative.split(os.sep)
    for end, part in enumerate(parts, start=1):
        if not is_text_name(part):
            return as_text(os.sep.join(parts[:end]))
    return None


def refuse_names_not_utf8(root: Path, entries: list[Path]) -> None:
    """One line naming the folder, class folders, folders and videos (``entries``, below ``root``) whose names are
    not UTF-8, before anything is probed or written: the manifest holds paths as text, and a class folder's name
    becomes a label of the model."""
    odd = [as_text(os.path.abspath(root))] if not is_text_name(os.path.abspath(root)) else []
    odd += dict.fromkeys(filter(None, (_first_odd_part(os.path.relpath(entry, root)) for entry in entries)))
    if odd:
        shown = ", ".join(odd[:3]) + (f" and {len(odd) - 3} more" if len(odd) > 3 else "")
        where = as_text(str(root))
        raise UserError(
            f"{len(odd)} name(s) in {where} are not UTF-8 text ({shown}): rename them to UTF-8 from the encoding "
            f"they were written in, e.g. `{RENAME_TO_UTF8} {where}` (cp437 for names from a zip file; without "
            "--notest it only shows the renames)"
        )
