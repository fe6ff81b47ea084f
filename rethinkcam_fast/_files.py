"""Output targets: what a write may replace.

Checkpoints, evaluation states and videos are written to a temporary file next to their target and
renamed over it (``os.replace``), so that a crash never leaves half a file. That rename replaces
whatever the path names: through a symlink it would replace the link (and leave the file it points to
as it was), and on a device or a named pipe (``/dev/null``, ``>(jq ...)``) it would put an ordinary
file in its place, which run as root replaces the device. These helpers say what to do instead.
"""

from __future__ import annotations

import os
import stat


_DESCRIPTOR_PATHS = ("/dev/", "/proc/")  # /dev/stdout, /dev/fd/N, /proc/self/fd/N: a descriptor, not a file


def is_stream(path: str) -> bool:
    """Whether ``path`` names something to write *into*, not a file to replace: an existing character
    device, named pipe or socket (a JSON-lines target such as ``>(jq ...)``), or a path through a
    process's descriptors (``/dev/stdout`` redirected to a log file names that file: written into, in
    append mode, never replaced)."""
    if os.path.abspath(path).startswith(_DESCRIPTOR_PATHS) and os.path.exists(path):
        return True
    try:
        mode = os.stat(path).st_mode  # (follows symlinks: /dev/fd/N links to its pipe)
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def output_folder(path: str) -> str:
    """The folder a write to ``path`` lands in: the resolved file's (a symlink may point elsewhere)."""
    return os.path.dirname(os.path.realpath(path))


def replaceable(path: str, what: str) -> str:
    """The path a temporary file should be renamed over to write ``path``: the file a symlink names
    (the link stays a link). Raises ``ValueError`` naming ``what`` when ``path`` exists and is not a
    regular file (a device, a pipe, a folder), which a rename would replace."""
    real = os.path.realpath(path)
    if os.path.exists(real) and not os.path.isfile(real):
        kind = "a folder" if os.path.isdir(real) else "a device, pipe or socket"
        raise ValueError(f"{what} {path!r} is {kind}, not a file: it is written by replacing a file; give a file path")
    return real


__all__ = ["is_stream", "output_folder", "replaceable"]
