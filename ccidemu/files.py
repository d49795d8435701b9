"""Files and directories that hold secrets or traces: private to the user, written safely.

Rules (docs/SECURITY.md, "Files"):

* a directory we create is mode 0700; one we reuse must be a directory owned by us (the
  effective user) that nobody else can write, else we refuse it: another local user could
  otherwise have created it first (``/tmp`` squatting) or swap files inside it;
* a file we create is mode 0600; an existing one must be owned by us, and is made 0600;
* state files are replaced atomically (temporary file, fsync, rename); the temporaries a
  killed process leaves behind hold the same secrets and are removed at the next start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import IO

from ccidemu.errors import ConfigError

__all__ = [
    "DirectoryLock",
    "check_private_dir",
    "ensure_private_dir",
    "open_private",
    "remove_temporaries",
    "write_atomically",
]

log = logging.getLogger(__name__)

_TMP_SUFFIX = ".tmp"


def _problem(st: os.stat_result) -> str | None:
    """Why a directory with this status is not private to us, or None."""
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not by you (uid {os.geteuid()})"
    if st.st_mode & 0o022:
        return f"can be written by other users (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def check_private_dir(path: Path, what: str) -> None:
    """ConfigError unless ``path`` is a directory owned by us that only we can write.

    A symbolic link is followed, and must itself be ours (or root's) too.
    """
    try:
        lst = path.lstat()
        st = path.stat()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror or exc}") from None
    if stat.S_ISLNK(lst.st_mode) and lst.st_uid not in (0, os.geteuid()):
        raise ConfigError(f"{what} {path} is a link owned by uid {lst.st_uid}; refusing it")
    why = _problem(st)
    if why is not None:
        raise ConfigError(f"{what} {path} {why}; refusing to use it")


def ensure_private_dir(path: Path, what: str) -> Path:
    """Create ``path`` mode 0700 (parents as needed), or check an existing one.

    Returns ``path``.  ConfigError naming ``what`` when it cannot be made or is not private.
    """
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot create {what} {path}: {exc.strerror or exc}") from None
    else:
        with contextlib.suppress(OSError):  # the umask may have taken bits away; never adds
            os.chmod(path, 0o700)
    check_private_dir(path, what)
    if not os.access(path, os.W_OK | os.X_OK):
        # ours, yet not writable (mode 0500, a read-only mount): say so now, not at the
        # first save, when a card's changes would be lost
        mode = stat.S_IMODE(path.stat().st_mode)
        raise ConfigError(f"{what} {path} is not writable (mode {mode:04o}"
                          f"{', or a read-only file system' if mode & 0o300 == 0o300 else ''})")
    return path


def open_private(path: Path, what: str, *, append: bool = True) -> IO[str]:
    """Open a text file for writing, created mode 0600; an existing one must be ours.

    An existing file readable by others is made 0600 (and that is logged).  ConfigError
    naming ``what`` when it cannot be opened or belongs to somebody else.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot open {what} {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} {path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise ConfigError(
                f"{what} {path} belongs to uid {st.st_uid}, not to you; refusing to write "
                "into it (another user could read it)")
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, 0o600)
            log.warning("%s %s was readable by other users (mode %04o); made it 0600",
                        what, path, stat.S_IMODE(st.st_mode))
        return os.fdopen(fd, "a" if append else "w", encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old or the new file, never half.

    Temporary file (mode 0600) in the same directory, fsync, ``os.replace``, fsync of the
    directory.  The temporary is removed when anything fails; one left by a killed process
    is removed by :func:`remove_temporaries`.
    """
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path),
                                    suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def remove_temporaries(path: Path) -> int:
    """Remove the temporaries :func:`write_atomically` left for ``path``; how many went."""
    prefix = _temporary_prefix(path)
    removed = 0
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return 0
    for entry in entries:
        name = entry.name
        if name.startswith(prefix) and name.endswith(_TMP_SUFFIX):
            try:
                entry.unlink()
            except OSError as exc:
                log.warning("cannot remove the stale temporary %s: %s", entry, exc)
                continue
            removed += 1
    if removed:
        log.info("removed %d temporary file(s) an interrupted write of %s left", removed, path)
    return removed


class DirectoryLock:
    """An exclusive lock on a state directory, held while a card's state may be written.

    Two VMs (or two daemons) must never write one state file: the second to lock is refused
    with a message naming the holder (``flock`` on ``DIR/.lock``, which holds its pid and
    label).  Released by :meth:`release` or when the process ends.
    """

    NAME = ".lock"

    def __init__(self, directory: Path, label: str) -> None:
        import fcntl

        self.path = directory / self.NAME
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot lock state directory {directory}: "
                              f"{exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise ConfigError(
                f"state directory {directory} is in use by {holder or 'another process'}; "
                "two VMs must not share card state (give each its own state_dir)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{label} (pid {os.getpid()})\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor drops the flock
