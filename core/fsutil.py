"""Atomic outputs: write next to the destination under a temporary name, rename at the end.

A failed step leaves nothing behind, and an existing output is never touched without force.
"""
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from edgec.core.errors import OutputExists


def check_writable(path, force: bool) -> Path:
    path = Path(path)
    if path.exists() and not force:
        raise OutputExists(f"{path} already exists; pass --force to replace it or choose another -o")
    if not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(path, force: bool = False, directory: bool = False):
    """Yield a temporary path beside `path`; on success move it into place, on failure remove it."""
    path = check_writable(path, force)
    prefix = f".{path.name}.tmp-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent)) if directory else \
        Path(tempfile.mktemp(prefix=prefix, suffix=path.suffix, dir=path.parent))
    try:
        yield tmp
        if path.exists():  # force: replace only now that the new output is complete
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise
