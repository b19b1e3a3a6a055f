"""Atomic writes: never leave a half-written file or clobber a user's work by accident."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import OutputExistsError


def check_output_dir(path: str | os.PathLike, overwrite: bool, marker_files: tuple[str, ...] = ()) -> Path:
    """Refuse an output directory that already holds files unless ``overwrite`` is set.

    With ``marker_files`` given, only a directory holding one of them counts as occupied (for example a
    training output dir may exist but must not already contain an adapter).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} exists and is not a directory")
    if path.is_dir() and not overwrite:
        names = set(os.listdir(path))
        taken = sorted(names & set(marker_files)) if marker_files else sorted(names)
        if taken:
            raise OutputExistsError(
                f"{path} already holds {', '.join(taken[:5])}; pass overwrite=True (CLI: --overwrite) "
                "to replace it, or choose another directory"
            )
    return path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temp file beside ``path``; on success rename it over ``path``, on failure delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temp directory beside ``path``; on success it replaces ``path`` in one rename.

    An existing ``path`` is kept untouched if anything fails, and is only replaced when ``overwrite``.
    """
    path = Path(path)
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise OutputExistsError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def chmod_like_mkdir(path: str | os.PathLike) -> None:
    """``tempfile.mkdtemp`` makes 0700 dirs; give a finished output dir the permissions ``mkdir`` would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
