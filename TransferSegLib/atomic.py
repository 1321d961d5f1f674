"""Files written whole or not at all, only where the user said: the one way TransferSeg writes.

* :func:`atomic_output` yields a temporary path beside a file and renames it into place: an
  existing file is only ever replaced by a complete one, and a failed or cancelled write
  leaves nothing behind.
* :func:`atomic_output_folder` does the same for a set of files in a folder: all of them or
  none, also over an earlier run's files (set aside and put back on failure, with SIGINT and
  SIGTERM held during the renames).
* :func:`check_output_folder` refuses, cheaply and before a long run, an output folder a run
  could not write whole, or where a write would land outside it or on the input.
* Temporary names carry their writer's process and host, so :func:`remove_stale_temporaries`
  removes what a killed run left, never what a live one is writing.

Imports nothing above :mod:`TransferSegLib.volume` (and the printing helper of
:mod:`TransferSegLib.progress`), so that every layer may write through it.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import threading
from pathlib import Path, PurePosixPath

from .progress import one_line
from .volume import TransferSegError

__all__ = ["atomic_output", "atomic_output_folder", "available_memory_bytes", "check_output_folder",
           "check_path_encoding", "full_suffix", "is_utf8", "remove_stale_temporaries", "resolved",
           "same_file"]


def full_suffix(path) -> str:
    """'.nii.gz' for 'ct.nii.gz', '.seg.nrrd' for 'a.seg.nrrd', else the last suffix (lower case)."""
    name = Path(path).name.lower()
    for double in (".nii.gz", ".seg.nrrd"):
        if name.endswith(double):
            return double
    return Path(name).suffix


# Temporary names carry their writer (process id and host) so that a later run can tell the leftovers
# of a killed run (SIGKILL, power loss) from a run still writing beside it, and remove only those.
_HOST = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
_STAGING = ".transferseg.tmp-"
_OWNED = re.compile(r"(?:\.transferseg\.tmp-|\..*\.tmp-|\..*\.partial-)(\d+)@([0-9a-f]{8})-[0-9a-f]{8}(?:\..*)?")


def _owned_token() -> str:
    return f"{os.getpid()}@{_HOST}-{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would end the process there: keep whatever we cannot check
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def remove_stale_temporaries(folder, prefix: str = "") -> list:
    """Remove the staging folders and partial files that a killed run of this host left in ``folder``
    (names ``.transferseg.tmp-PID@HOST-…``, ``.NAME.tmp-PID@HOST-…``, ``.NAME.partial-PID@HOST-…``
    whose process is gone), only those whose name starts with ``prefix`` when given; a live run's
    own are kept.  Returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _OWNED.fullmatch(entry.name) if entry.name.startswith(prefix) else None
        if not match or match.group(2) != _HOST or _alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed


def resolved(path) -> Path:
    """``path`` with its links followed; a loop of links is refused in one line (Python raises)."""
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as e:  # RuntimeError: Python < 3.13's "Symlink loop"
        raise TransferSegError(f"{one_line(path)}: cannot follow its links ({one_line(e)}); is it a loop of "
                               "symbolic links? Fix or remove the link") from None


def same_file(a, b) -> bool:
    """Whether writing ``a`` would replace ``b``: the same path once links are followed, or a hard link."""
    a, b = Path(a), Path(b)
    return a.exists() and b.exists() and os.path.samefile(a, b) or resolved(a) == resolved(b)


def _short(name: str) -> str:
    """The start of a name, for the temporary names made from it: a legal 250-character name plus
    ".partial-PID@HOST-TOKEN" would pass the file system's 255-byte limit."""
    return name[:64]


def is_utf8(path) -> bool:
    """Whether ``path``'s name is valid UTF-8 (Python holds the bytes of one that is not as surrogates)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_path_encoding(path, what: str = "the file") -> None:
    """Refuse a path with a name that is not valid UTF-8: SimpleITK's native code aborts the whole
    process on such a name, with nothing on stderr."""
    if not is_utf8(path):
        raise TransferSegError(f"{one_line(path)}: the name of {what} is not valid UTF-8 (its bytes are shown "
                               "escaped); rename it")


@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary path beside ``path`` (same suffix); rename it to ``path`` on success.

    On any exception (including KeyboardInterrupt and cancellation) the temporary file is
    removed and ``path`` is left exactly as it was.  The parent folder is created if missing.
    """
    path = Path(path)
    if path.is_dir():
        raise TransferSegError(f"cannot write {path}: it is an existing folder; give a file name, or move the folder "
                               "away")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = full_suffix(path)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    tmp = path.with_name(f".{_short(stem)}.partial-{_owned_token()}{suffix}")
    try:
        yield tmp
        if not tmp.exists():
            raise TransferSegError(f"writing {path} produced no file")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def check_output_folder(folder, names=(), input_path=None) -> Path:
    """Return ``folder`` as a Path if it is a folder or can be created as one, and each of ``names``
    (the files a run writes, relative paths such as ``views/axial.nii.gz``) can be written inside
    it; else raise :class:`TransferSegError`.  Cheap: call it before a long run, not only when
    writing.

    Refused: a name that is not valid UTF-8, a file where the folder or one of its parents should
    be, a folder without write permission, a file or folder in the way of a name, a name whose
    folder is a link leading outside ``folder`` (every write must land inside it), and with
    ``input_path``, a name that is the input file itself."""
    folder = Path(folder).expanduser()
    check_path_encoding(folder, "the output folder")
    names = _relative_names(names)
    if input_path is not None:
        source = resolved(input_path)
        for name in names:
            if resolved(folder / name) == source:
                raise TransferSegError(
                    f"the output {folder / name} would overwrite the input; choose another output folder")
    if folder.is_symlink() and not folder.exists():
        raise TransferSegError(f"the output folder {folder} is a link to {os.readlink(folder)}, which does not exist; "
                               "create that folder or remove the link")
    if (folder.exists() or folder.is_symlink()) and not folder.is_dir():
        raise TransferSegError(
            f"the output folder {folder} is an existing file; give the name of a folder (it is created if "
            "missing), or move the file away"
        )
    for nearest in [folder, *folder.parents]:
        if nearest.exists():
            if not nearest.is_dir():
                raise TransferSegError(f"cannot create the output folder {folder}: {nearest} is a file, not a folder")
            if not os.access(nearest, os.W_OK | os.X_OK):
                raise TransferSegError(f"cannot write the output folder {folder}: permission denied in {nearest}; "
                                       "choose a folder you may write to")
            break
    if folder.is_dir():
        _check_targets(folder, names)
    return folder


def _check_targets(folder: Path, names) -> None:
    """Nothing in the way of any of ``names`` in the existing ``folder``, and none of them lands outside it."""
    inside = resolved(folder)
    for name in names:
        target = folder / name
        blocked = [folder / p for p in name.parents[:-1] if (folder / p).exists() and not (folder / p).is_dir()]
        blocked += [target] if target.is_dir() else []
        if blocked:
            raise TransferSegError(f"cannot write {target}: {blocked[0]} is in the way; move it away")
        holder = resolved(target.parent)
        if holder != inside and inside not in holder.parents:
            raise TransferSegError(f"cannot write {target}: {target.parent} is a link that leads outside the output "
                                   f"folder (to {holder}); remove the link or choose another output folder")


def _relative_names(names) -> list:
    names = [PurePosixPath(n) for n in names]
    for name in names:
        if name.is_absolute() or ".." in name.parts or not name.parts:
            raise ValueError(f"output names must be relative paths inside the folder; got {str(name)!r}")
    if len(set(names)) != len(names):
        raise ValueError("output names must be unique")
    return names


@contextlib.contextmanager
def _signals_held():
    """SIGINT, SIGTERM and SIGHUP wait until the block is done, then reach their handlers: a second
    Ctrl-C cannot stop a replace half way.  Python runs signal handlers in the main thread only, so
    elsewhere nothing can interrupt the block and nothing is changed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    held = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous = {sig: signal.getsignal(sig) for sig in held}
    previous = {sig: handler for sig, handler in previous.items() if handler is not None}  # not ours to replace
    for sig in previous:
        signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in caught:  # now, in the order they came
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


def _move_in(staging: Path, folder: Path, names) -> None:
    """Move the staged files over ``folder``'s, all of them or none: a file being replaced is first set
    aside in the staging folder, so a failure half way puts every earlier file back."""
    aside = staging / ".replaced"
    steps = []  # ("made", folder) | ("aside", name) | ("in", name), in the order done
    with _signals_held():
        try:
            for name in names:
                holder = (folder / name).parent
                if not holder.exists():
                    holder.mkdir(parents=True)
                    steps.append(("made", holder))
                if os.path.lexists(folder / name):
                    (aside / name).parent.mkdir(parents=True, exist_ok=True)
                    os.rename(folder / name, aside / name)
                    steps.append(("aside", name))
                os.rename(staging / name, folder / name)
                steps.append(("in", name))
        except BaseException:
            for step, what in reversed(steps):
                with contextlib.suppress(OSError):
                    if step == "in":
                        os.rename(folder / what, staging / what)
                    elif step == "aside":
                        os.rename(aside / what, folder / what)
                    else:
                        what.rmdir()
            raise


@contextlib.contextmanager
def atomic_output_folder(folder, names):
    """Yield an empty staging folder; move the files ``names`` (relative paths, e.g.
    ``views/axial.nii.gz``) from it into ``folder`` only when the block has written every one.

    A new ``folder`` is staged beside it and renamed into place in one step.  An existing one
    is staged in a hidden subfolder (the same filesystem even if ``folder`` is a mount point,
    and no need to write in its parent) and its files are replaced all together or not at all
    (:func:`_move_in`: SIGINT and SIGTERM wait for the end, a failure rolls back); its other
    files are never touched.  On any exception (including KeyboardInterrupt and cancellation),
    or if the block wrote other files than ``names``, the staging folder is removed and
    ``folder`` is left exactly as it was.  Staging folders that a killed run left behind (its
    process gone) are removed first.
    """
    folder = check_output_folder(folder, names)
    names = _relative_names(names)
    existed = folder.is_dir()
    created = [p for p in folder.parents if not p.exists()]  # deepest first
    if not created:
        remove_stale_temporaries(folder.parent, prefix=f".{_short(folder.name)}.tmp-")
    token = _owned_token()
    if existed:
        remove_stale_temporaries(folder)
        staging = folder / f"{_STAGING}{token}"
    else:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = folder.parent / f".{_short(folder.name)}.tmp-{token}"
    staging.mkdir()
    try:
        yield staging
        written = sorted(PurePosixPath(p.relative_to(staging).as_posix()) for p in staging.rglob("*")
                         if not p.is_dir())
        if written != sorted(names):
            raise RuntimeError(f"expected to write {sorted(map(str, names))} but wrote {list(map(str, written))}")
        moved = False
        if not existed:
            try:
                os.rename(staging, folder)
                moved = True
            except OSError:  # the folder appeared meanwhile: replace file by file as below
                if not folder.is_dir():
                    raise
        if not moved:
            _move_in(staging, folder, names)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in created:  # folders made only to hold the staging folder
            with contextlib.suppress(OSError):
                parent.rmdir()
        # the user knows the output folder, not its staging folder: name what failed by where it was going
        if isinstance(error, OSError):
            where = str(error.filename).replace(str(staging), str(folder)) if error.filename else str(folder)
            text = error.strerror or str(error)
            raise OSError(error.errno, text if error.filename else f"{text} while writing into", where) from None
        if isinstance(error, TransferSegError) and str(staging) in str(error):
            raise TransferSegError(str(error).replace(str(staging), str(folder))) from None
        raise
    shutil.rmtree(staging, ignore_errors=True)  # what is left of it: the replaced files, empty subfolders


def available_memory_bytes() -> int:
    """Memory the OS can give us now (MemAvailable), or a conservative guess off Linux."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30
