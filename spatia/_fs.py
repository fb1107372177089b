"""Folders written whole or not at all: write beside the destination, then swap it in by renames."""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger("spatia")

OLD_TAG = ".old-"  # the previous folder during a swap: <name>.old-<id>, deleted once the new one is in


def fsync_folder(folder: Path) -> None:
    """Flush the files of ``folder`` and the folder itself to disk (no-op where the OS does not allow it)."""
    for p in [*folder.iterdir(), folder]:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def swap_in(tmp: Path, path: Path, *, what: str = "folder") -> None:
    """Move the complete folder ``tmp`` to ``path`` by renames: the previous one → ``<path>.old-<id>``, the new
    one → ``path``, then delete the previous one. At every instant one complete folder is at ``path`` or at
    ``<path>.old-<id>``; ``what`` names it in the messages."""
    old = None
    if path.exists():
        old = path.with_name(f"{path.name}{OLD_TAG}{uuid.uuid4().hex[:12]}")
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            try:
                os.replace(old, path)  # put the previous one back
            except OSError:
                logger.error("Could not move the previous %s back from %s to %s.", what, old, path)
        raise
    fsync_folder(path.parent)
    if old is not None:
        try:
            shutil.rmtree(old)
        except OSError as e:  # the new one is in place; the next write removes the old one
            logger.warning("Wrote the %s to %s but could not delete the previous one in %s: %s", what, path, old, e)


@contextmanager
def written_beside(path: Path, *, what: str, tmp_name: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (``tmp_name``, default ``.<name>.tmp-<id>``) to write into; when the
    block completes, :func:`swap_in` moves it to ``path``. The temporary path is removed whatever happens, so an
    interrupted write leaves ``path`` as it was."""
    tmp = path.with_name(tmp_name or f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        yield tmp
        swap_in(tmp, path, what=what)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
