"""Paths a user names: inputs that must exist (symbolic link loops named as such) and outputs that must be
writable, checked before any work so that a refused command has done nothing."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

from medseg.errors import MedsegError

# File systems whose files are made by the kernel: writing a label map there is never meant.
_VIRTUAL_FILE_SYSTEMS = frozenset(
    [
        "proc",
        "sysfs",
        "devtmpfs",
        "devpts",
        "cgroup",
        "cgroup2",
        "debugfs",
        "securityfs",
        "tracefs",
        "configfs",
        "pstore",
        "bpf",
        "fusectl",
        "mqueue",
        "binfmt_misc",
        "efivarfs",
        "hugetlbfs",
        "autofs",
    ]
)
_VIRTUAL_PREFIXES = ("/proc", "/sys")


def link_problem(path: Path) -> str | None:
    """``"symbolic link loop"`` or ``"dangling symbolic link to X"`` when ``path`` or a folder above it is one,
    else None."""
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symbolic link loop (the link, or a folder above it, points back at itself)"
        if os.path.islink(path):
            return f"dangling symbolic link to {os.readlink(path)}"
        return None
    return None


def check_exists(path: Path) -> None:
    """Raise unless ``path`` exists.

    Raises:
        MedsegError: a symbolic link loop, a dangling link, or no such file or folder.
    """
    if os.path.exists(path):
        return
    raise MedsegError(link_problem(path) or "no such file or folder", path)


def _mount_type(path: Path) -> str | None:
    """The file system type of the mount holding ``path`` (Linux ``/proc/self/mounts``), or None."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    best, kind = "", None
    text = str(path)
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ")
        if (text == mount or text.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, kind = mount, fields[2]
    return kind


def _special_file(path: Path) -> str | None:
    """``"a character device"``, ``"a block device"``, ``"a named pipe"`` or ``"a socket"`` when ``path`` is one."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    for test, name in (
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return None


def check_output(path: Path, *, folder: bool = True) -> None:
    """Raise unless ``path`` can be written as an output: a folder (``folder``), or a file or folder.

    Checks, creating nothing: no symbolic link loop on the way; not a device, pipe or socket (``/dev/full``,
    ``/dev/null``); not on a kernel file system (``/proc``, ``/sys``, ``/dev``); an existing ``path`` is a
    folder when one is needed; the nearest existing folder on the way accepts a new file (probed with a hidden
    temporary file, removed at once).

    Raises:
        MedsegError: as above, naming ``path``.
    """
    path = Path(path)
    problem = link_problem(path)
    if problem:
        raise MedsegError(f"cannot write here: {problem}", path)
    absolute = Path(os.path.abspath(path))
    existing = absolute
    while not os.path.exists(existing):
        problem = link_problem(existing)
        if problem:
            raise MedsegError(f"cannot write here: {problem}", path)
        existing = existing.parent
    resolved = existing.resolve()
    special = _special_file(resolved)
    if special:  # /dev/full, /dev/null, a pipe: written to, they keep nothing (and a rename would replace them)
        raise MedsegError(f"cannot write here: {resolved} is {special}, not a file or folder to hold a result", path)
    kind = _mount_type(resolved)
    if kind in _VIRTUAL_FILE_SYSTEMS or str(resolved).startswith(_VIRTUAL_PREFIXES):
        raise MedsegError(f"cannot write here: {resolved} is a kernel file system ({kind or 'virtual'})", path)
    if existing == absolute and not existing.is_dir():
        if folder:
            raise MedsegError("is a file; -o needs a folder", path)
        existing = existing.parent
    elif not existing.is_dir():
        raise MedsegError(f"cannot write here: {existing} is a file, not a folder", path)
    try:
        handle, probe = tempfile.mkstemp(prefix=".medseg-probe.", dir=existing)
    except OSError as err:
        reason = err.strerror or str(err)
        raise MedsegError(f"cannot write here ({reason} in {existing})", path) from None
    os.close(handle)
    os.unlink(probe)
