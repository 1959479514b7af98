"""The folder ``vidray export`` writes (vidray/infer/export.py): what in it vidray may delete, and what it keeps.

An export is written beside ``--out`` (``<out>.partial``) and moved into place whole; the earlier export
it replaces is moved aside (``<out>.partial-old``) and deleted after. A folder is deleted only when an
export left it (:func:`clear_leftover`), and a git clone's repository is carried into the new export
(:func:`carry_repository`), never deleted.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from vidray.errors import UserError
from vidray.model.checkpoint import INFO


def is_export(directory: Path) -> bool:
    # A training checkpoint also has vidray.json; only an export records where it came from.
    try:
        return "exported_from" in json.loads((directory / INFO).read_text())
    except (OSError, ValueError):
        return False


# Marks a folder an export is writing (<out>.partial) or deleting (the earlier export, moved aside to
# <out>.partial-old): what an interrupted export leaves of either is then known as vidray's, and deleted.
UNFINISHED = ".vidray_unfinished"


def delete_folder(folder: Path) -> None:
    """Delete ``folder``, marked :data:`UNFINISHED` until its last other file is gone."""
    (folder / UNFINISHED).touch()
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.name != UNFINISHED:
            entry.unlink()
    (folder / UNFINISHED).unlink()
    folder.rmdir()


def clear_leftover(folder: Path, out: Path) -> None:
    """Delete what an interrupted export left at ``folder`` (empty, marked :data:`UNFINISHED`, or a whole export);
    refuse anything else there in one line: a folder of that name may be someone's own."""
    if not folder.exists() and not folder.is_symlink():
        return
    if (folder / ".git").exists():  # a repository is never deleted: see carry_repository
        raise UserError(f"{folder} holds a .git: an export to {out} stopped while it moved that repository and your "
                        f"files into its new export there; move them back into {out}, then export again")  # fmt: skip
    ours = folder.is_dir() and not folder.is_symlink()
    if not (ours and (not any(folder.iterdir()) or (folder / UNFINISHED).exists() or is_export(folder))):
        raise UserError(f"{folder} is in the way of --out {out} (an export writes there) and vidray did not write it: "
                        "move or delete it, or pass another --out")  # fmt: skip
    try:
        delete_folder(folder)
    except OSError as err:
        raise UserError(f"cannot delete {folder}, left by an interrupted export ({err}): delete it yourself") from None


def carry_repository(old: Path, new: Path, written_sometimes: tuple[str, ...]) -> None:
    """Move a git clone's .git and every file the new export ``new`` did not write (.gitattributes, the user's
    notes) from the earlier export ``old``, which ``new`` then replaces: re-exported into a clone of a pushed
    export (the Hub's), the new weights are there to commit. Not ``written_sometimes``, files an export writes
    for some models only: the new model has none. .git goes first, and a leftover holding it is never deleted
    (:func:`clear_leftover`), so a stop part-way loses none of them. A folder without .git is replaced whole."""
    if not (old / ".git").exists():
        return
    for name in [".git", *sorted(entry.name for entry in old.iterdir() if entry.name != ".git")]:
        if name not in written_sometimes and not (new / name).exists():
            (old / name).replace(new / name)
