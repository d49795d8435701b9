"""Line input for the text importers: bounded lines from any binary stream, paths or text.

Streaming: a file is read in chunks and cut into lines, so memory stays bounded by the
longest line (capped at :data:`MAX_LINE`; a longer one is reported and skipped).  Bytes that
are not UTF-8 become U+FFFD, which no format accepts, so the line is reported by whichever
parser meets it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, cast

from ccidemu.errors import ConfigError
from ccidemu.traces.model import Problems

__all__ = ["MAX_LINE", "Lines", "Source", "open_binary", "text_lines"]

#: The longest line read (a 65,535-byte APDU as spaced hex is under 200 KB).
MAX_LINE = 4 << 20
_CHUNK = 1 << 16

#: A trace source: a path, an open binary file, raw bytes, or lines of text.
Source = str | os.PathLike[str] | bytes | BinaryIO | Iterable[str]
Lines = Iterator[tuple[int, str]]
BinarySource = str | os.PathLike[str] | bytes | BinaryIO


def source_name(source: object) -> str:
    if isinstance(source, str | os.PathLike):
        return str(source)
    name = getattr(source, "name", None)
    return str(name) if isinstance(name, str) else "trace"


@contextmanager
def open_binary(source: BinarySource) -> Iterator[BinaryIO]:
    """A binary stream for a path, bytes or an open file (left open); ConfigError if absent."""
    if isinstance(source, bytes | bytearray | memoryview):
        yield io.BytesIO(bytes(source))
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        try:
            f = path.open("rb")
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
        with f:
            yield f
    else:
        yield source


def _split(stream: BinaryIO, name: str, problems: Problems) -> Lines:
    number = 0
    pending = bytearray()
    skipping = False  # inside an over-long line: drop bytes up to its newline
    while True:
        chunk = stream.read(_CHUNK)
        if not chunk:
            break
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                if not skipping:
                    pending += chunk[start:]
                    if len(pending) > MAX_LINE:
                        skipping = True
                        pending.clear()
                break
            number += 1
            if skipping:
                skipping = False
                problems.report(f"{name}:{number}", f"line longer than {MAX_LINE} bytes")
            else:
                pending += chunk[start:end]
                yield number, pending.decode("utf-8", "replace").rstrip("\r")
                pending.clear()
            start = end + 1
    if skipping:
        problems.report(f"{name}:{number + 1}", f"line longer than {MAX_LINE} bytes")
    elif pending:
        yield number + 1, pending.decode("utf-8", "replace").rstrip("\r")


def text_lines(source: Source, problems: Problems, name: str | None = None) -> Lines:
    """``(line number, text)`` of every line of ``source`` (newline removed)."""
    label = name or source_name(source)
    if isinstance(source, str | os.PathLike | bytes | bytearray | memoryview) or hasattr(
        source, "read"
    ):
        with open_binary(cast(BinarySource, source)) as stream:
            yield from _split(stream, label, problems)
    else:
        for number, line in enumerate(source, 1):
            yield number, line.rstrip("\r\n")
