"""The batch job's output file: whole lines, in input order, that survive a kill at any moment.

Each answer is one line of compact JSON (JSON escapes every newline inside it, so the only `\\n` of a
line is its end) written with `os.write` straight to the file descriptor, in input order: an answer
that finishes before an earlier one waits in memory. A process killed mid-write can leave only a tail
without its `\\n`; `resume_point` cuts that tail off and counts the complete lines, which the job then
skips in its input. The file is fsync'ed every `fsync_every_s` seconds and at the end, so a power
loss, too, costs at most the last seconds of lines (and never tears one that `resume_point` keeps).
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass

FSYNC_EVERY_S = 2.0


@dataclass
class ResumePoint:
    lines: int = 0  # complete lines already in the output
    failed: int = 0  # of those, error records


def encode_record(record: dict) -> bytes:
    """An output line: compact JSON and its `\\n`."""
    return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def is_error_record(line: bytes) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return True
    return isinstance(record, dict) and "error" in record


def resume_point(path: str) -> ResumePoint:
    """Complete lines of an existing output file, after cutting off a torn last line (none: 0 lines)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return ResumePoint()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    lines = data[:end].split(b"\n")[:-1]
    return ResumePoint(lines=len(lines), failed=sum(is_error_record(line) for line in lines))


class OrderedWriter:
    """Writes records in index order from `start`; `put` may come in any order."""

    def __init__(self, fd: int, start: int, fsync_every_s: float = FSYNC_EVERY_S):
        self.fd, self.next = fd, start
        self._pending: dict[int, bytes] = {}
        self._fsync_every_s = fsync_every_s
        self._last_sync = time.monotonic()
        self._can_sync = stat.S_ISREG(os.fstat(fd).st_mode)  # not a pipe or terminal

    @property
    def waiting(self) -> int:
        """Finished records held back behind an unfinished earlier one."""
        return len(self._pending)

    def put(self, index: int, record: dict) -> None:
        self.put_line(index, encode_record(record))

    def put_line(self, index: int, line: bytes) -> None:
        """`put` for a record already encoded (`encode_record`) elsewhere, such as on a Ray worker."""
        self._pending[index] = line
        while self.next in self._pending:
            _write_all(self.fd, self._pending.pop(self.next))
            self.next += 1
        if self._can_sync and time.monotonic() - self._last_sync >= self._fsync_every_s:
            self.sync()

    def sync(self) -> None:
        if self._can_sync:
            os.fsync(self.fd)
        self._last_sync = time.monotonic()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def open_output(path: str) -> tuple[int, ResumePoint]:
    """The output's file descriptor (appending after the complete lines) and what it already holds;
    `-` is standard output, never resumed."""
    if path == "-":
        return 1, ResumePoint()
    point = resume_point(path)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644), point
