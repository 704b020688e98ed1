"""Read documents in a child process that can be killed: no file can stall or crash its caller.

A library is untrusted input: one crafted PDF can take days in pypdf, an HTML page of a few hundred
KB can take an hour in Python's own parser, a DOCX can expand to gigabytes. :class:`SandboxedReader`
reads each file in a long-lived child process under an address-space limit
(``ReadLimits.max_memory_mb`` above what the child holds when it starts) and waits at most
``ReadLimits.max_seconds`` for it; a file that breaks either is a :class:`DocumentError` naming the
limit, the child is replaced, and the caller goes on with the next file. The child is a fresh
interpreter (``python -m qa_common.library.sandbox``), never a fork of the caller, whose threads
(Ray's) a fork would copy in whatever state they are in; it speaks JSON lines on its stdin/stdout.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import select
import subprocess
import sys
from pathlib import Path

from qa_common.library.documents import Block, DocumentError, ReadLimits, read_blocks


def _address_space() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[0]) * resource.getpagesize()


def _serve(limits: ReadLimits) -> None:
    """The child: for each path on stdin, one line ``{"blocks": [[text, page, section], ...]}`` or ``{"error": reason}``."""
    ceiling = _address_space() + limits.max_memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (ceiling, ceiling))
    for line in sys.stdin:
        try:
            answer = {"blocks": [dataclasses.astuple(block) for block in read_blocks(Path(line.rstrip("\n")), limits)]}
        except DocumentError as error:
            answer = {"error": str(error)}
        except MemoryError:
            answer = {"error": f"needs more than {limits.max_memory_mb:,} MB of memory to read (--max-memory-mb)"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


class SandboxedReader:
    """``read(path)`` -> the file's blocks, read in a child process under ``limits``. Use as a context
    manager (or call :meth:`close`) so the child ends with it."""

    def __init__(self, limits: ReadLimits = ReadLimits()):
        self.limits = limits
        self.process: subprocess.Popen | None = None

    def _start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "qa_common.library.sandbox", json.dumps(dataclasses.asdict(self.limits))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, encoding="utf-8")

    def read(self, path: str | Path) -> list[Block]:
        if "\n" in str(path):
            raise DocumentError("has a line break in its name; rename it")
        if self.process is None or self.process.poll() is not None:
            self._start()
        try:
            self.process.stdin.write(f"{path}\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            self.close()
            raise DocumentError("its reader could not start") from None
        ready, _, _ = select.select([self.process.stdout], [], [], self.limits.max_seconds)
        if not ready:
            self.close()
            raise DocumentError(f"took longer than {self.limits.max_seconds:g} s to read (--max-seconds)")
        line = self.process.stdout.readline()
        if not line:  # the child died: killed for memory, or its parser crashed
            self.close()
            raise DocumentError(f"its reader stopped (out of memory above {self.limits.max_memory_mb:,} MB, "
                                "or a crash in the parser)")
        answer = json.loads(line)
        if "error" in answer:
            raise DocumentError(answer["error"])
        return [Block(*block) for block in answer["blocks"]]

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            for stream in (self.process.stdin, self.process.stdout):
                stream.close()
        self.process = None

    def __enter__(self) -> SandboxedReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    _serve(ReadLimits(**json.loads(sys.argv[1])))
