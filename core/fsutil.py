"""Outputs that never replace or lose what the user has.

Everything is written next to the destination under a hidden temporary name and moved into place at the
end with a rename that refuses to replace anything (Linux renameat2 RENAME_NOREPLACE), so something that
appeared at -o while the work ran is kept and the late writer fails instead. Destinations that no build
should write (/, the current folder, a symlink, the input model, a folder of someone else's files) are
refused up front, before any work. A failure (or SIGINT/SIGTERM, see edgec.cli) removes the temporary and the
parent folders this run created.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from edgec.core.errors import OptionError, OutputExists

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100

# Temporaries being written now, with the parent folders their call created: what a forced exit after SIGTERM
# (edgec.runtime.cli) removes when the normal unwinding did not get to run.
_LIVE: dict[Path, list[Path]] = {}


# ---------------------------------------------------------------- what may be written where

def is_edgec_package(folder) -> bool:
    """A folder whose manifest says it is an edgec package (what --force may replace)."""
    from edgec.core.package import MANIFEST_FILE, SCHEMA
    try:
        schema = json.loads((Path(folder) / MANIFEST_FILE).read_text()).get("schema", "")
    except (OSError, ValueError, AttributeError):
        return False
    return schema == SCHEMA


def _describe(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return f"{len(names)} entr{'y' if len(names) == 1 else 'ies'} (e.g. {', '.join(names[:3])})"


def check_writable(path, force: bool, *, inputs=(), directory: bool = False, replaceable=None) -> Path:
    """Refuse, before any work, an output that must not be written; nothing is created here.

    `inputs`: paths the command reads (the model, data files): never replaced nor inside a replaced folder.
    `directory`: the output is a folder; --force replaces only an edgec package (or `replaceable(path)`)
    or an empty folder."""
    path = Path(path)
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == Path(resolved.anchor) or resolved == cwd or resolved in cwd.parents or \
            resolved == Path.home().resolve():
        raise OptionError(f"-o {path} is {'the current folder' if resolved == cwd else 'a folder above your work'}"
                          "; name a new output, e.g. -o model.edgec")
    if path.is_symlink():
        raise OptionError(f"-o {path} is a symlink; pass the real path (edgec does not write through links)")
    for source in filter(None, inputs):
        source = Path(source)
        if source.exists() and (resolved == source.resolve() or resolved in source.resolve().parents):
            raise OptionError(f"-o {path} would replace the input {source}; choose another -o")
    if path.exists():
        if not force:
            raise OutputExists(f"{path} already exists; pass --force to replace it or choose another -o")
        _check_replaceable(path, directory, replaceable)
    parent = _existing_parent(resolved)
    if not parent.is_dir():
        raise OptionError(f"-o {path}: {parent} is a file, not a folder; choose another -o")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OptionError(f"-o {path}: cannot write in {parent} (permission denied); choose another -o")
    return path


def _check_replaceable(path: Path, directory: bool, replaceable=None) -> None:
    if directory:
        if not path.is_dir():
            raise OutputExists(f"{path} is a file, not an edgec package; --force replaces only a package or an "
                               "empty folder; choose another -o")
        ok = is_edgec_package(path) or not any(path.iterdir()) or (replaceable is not None and replaceable(path))
        if not ok:
            raise OutputExists(f"{path} is not an edgec package: --force would delete its {_describe(path)}; "
                               "--force replaces only a package or an empty folder; choose another -o")
    elif path.is_dir():
        raise OutputExists(f"{path} is a folder, not a file: --force would delete its {_describe(path)}; "
                           "choose another -o")
    elif not path.is_file():
        raise OutputExists(f"{path} is not a regular file (a device, fifo or socket); --force replaces only a "
                           "file; choose another -o")


def _existing_parent(path: Path) -> Path:
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


# ---------------------------------------------------------------- no-replace rename

def _renameat2():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_RENAMEAT2 = _renameat2()


def rename_noreplace(src, dst) -> None:
    """Move src to dst; FileExistsError if dst exists, never replacing it (atomic where the kernel allows)."""
    src, dst = os.fspath(src), os.fspath(dst)
    if _RENAMEAT2 is not None:
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST or err == errno.ENOTEMPTY:
            raise FileExistsError(errno.EEXIST, "exists", dst)
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EPERM):  # EINVAL etc.: the filesystem cannot; fall back
            raise OSError(err, os.strerror(err), dst)
    if os.path.isdir(src):
        # fallback for folders: os.rename onto an empty folder would replace it; check first (a tiny window)
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "exists", dst)
        os.rename(src, dst)
    else:
        os.link(src, dst)  # fails if dst exists: atomic no-replace for files
        os.unlink(src)


# ---------------------------------------------------------------- atomic outputs

def _make_parents(path: Path) -> list[Path]:
    """Create the missing parent folders; returns the ones created (deepest last)."""
    created = []
    for parent in reversed(path.parents):
        if not parent.exists():
            parent.mkdir()
            created.append(parent)
    return created


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_path(path, force: bool = False, directory: bool = False, *, inputs=(), replaceable=None):
    """Yield a temporary path beside `path`; on success move it into place without replacing anything that
    is not ours to replace, on failure remove it and the parent folders this call created."""
    path = check_writable(path, force, inputs=inputs, directory=directory, replaceable=replaceable)
    created = []
    try:   # the temporary is really created (then, for a file, left for the writer to make): a place that
        # refuses it (/proc, a read-only mount, where access() said yes to root) is refused before any work
        created = _make_parents(path.absolute())
        prefix = f".{path.name}.tmp-"
        if directory:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=path.suffix, dir=path.parent)
            os.close(fd)
            os.unlink(name)
            tmp = Path(name)
    except OSError as e:
        _remove_created(created)
        raise OptionError(f"-o {path}: cannot write in {path.parent} ({e.strerror}); choose another -o") from None
    _LIVE[tmp] = created
    try:
        yield tmp
        _move_into_place(tmp, path, force, directory, replaceable)
    except BaseException:
        _remove(tmp)
        _remove_created(created)
        raise
    finally:
        _LIVE.pop(tmp, None)


def remove_live_temporaries() -> None:
    """Remove every temporary output still being written (and the folders made for it): the last resort of an
    exit that cannot unwind."""
    for tmp, created in list(_LIVE.items()):
        with contextlib.suppress(OSError):
            _remove(tmp)
        _remove_created(created)
        _LIVE.pop(tmp, None)


def _remove_created(created: list[Path]) -> None:
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if still empty: never what someone else put there meanwhile


def _move_into_place(tmp: Path, path: Path, force: bool, directory: bool, replaceable) -> None:
    try:
        rename_noreplace(tmp, path)
        return
    except FileExistsError:
        if not force:
            raise OutputExists(f"{path} appeared while this ran (another build?); it was kept and this output "
                               "discarded; pass --force to replace it or choose another -o") from None
    if path.is_symlink():
        raise OptionError(f"-o {path} became a symlink while this ran; it was kept and this output discarded")
    _check_replaceable(path, directory, replaceable)  # what is there now, not what was there at the start
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.rename(path, old)
    try:
        rename_noreplace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            rename_noreplace(old, path)  # put the original back
        raise
    _remove(old)


# ---------------------------------------------------------------- folders written file by file

def claim_folder(path, marker: str, *, create: bool = True) -> Path:
    """A working folder that edgec writes file by file (compare): one this tool created before (it holds
    `marker`), an empty one, or a new one. A folder of other files is refused: edgec would overwrite them."""
    path = Path(path)
    ours = (path / marker).is_file()
    if path.is_dir() and not ours and any(path.iterdir()):
        raise OutputExists(f"{path} exists with {_describe(path)} that edgec did not write; it would overwrite "
                           "them: choose a new or empty folder for -o")
    check_writable(path, force=True, directory=True, replaceable=lambda p: ours)
    if create:
        _make_parents(path.absolute())
        path.mkdir(exist_ok=True)
        (path / marker).touch()
    return path
