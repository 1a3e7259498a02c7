"""`gpt2serve batch`: a file of requests, one per line, answered line for line in input order.

An input line is a request of the seed API (current or first-generation fields, docs/API.md §1-2), an
OpenAI-style completion request (an object with `prompt` and no `input`), or a bare JSON string (the
prompt, with the seed API's defaults). Output line i answers input line i, as one JSON object:
`{"id": <the input's id>, "output": <the server's answer>}`, or `{"id": ..., "error": {...}}` with the
server's error object for a line that failed (bad JSON, an unknown mode, an empty line ...); `id` only
where the input object has one. Parsing and validation are the server's own (api/protocol.py,
api/openai_protocol.py), so fields, limits and messages match its answers.

Local mode loads the engine once and keeps `concurrency` requests in flight, so each decode step runs a
full batch. `--url` mode sends each line to a running server (`/invocations` and `/v1/completions` under
the URL, or the one path given, such as a SageMaker runtime `/endpoints/<name>/invocations`) with at
most `concurrency` requests open; a busy answer (503, 429) or a broken connection is retried.

`--ray` mode spreads the lines over engine actors on a Ray cluster with Ray Data (gpt2serve.scale.batch),
each answering as local mode does; the output side (`Job`) is the same in every mode.

Resuming and kills: see `gpt2serve.batch_output`. Exit status: 0 when every line was answered, 1 when
some line got an error record, 2 when the job could not run or stopped early (rerun it to resume).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from gpt2serve.api import content
from gpt2serve.api.errors import APIError
from gpt2serve.batch_output import OrderedWriter, ResumePoint, open_output
from gpt2serve.batch_progress import Progress

log = logging.getLogger(__name__)

EXIT_OK, EXIT_LINES_FAILED, EXIT_STOPPED = 0, 1, 2
WINDOW_PER_SLOT = 8  # finished answers held back behind a slow line, per request in flight


@dataclass(frozen=True)
class BatchOptions:
    input: str
    output: str
    model: str = "random:gpt2"
    url: str | None = None
    concurrency: int | None = None  # None: 2 x max_batch_size locally, 16 against a server
    device: str = "cpu"
    dtype: str | None = None
    max_batch_size: int = 48  # the server's 32 leave a 3-sequence request's slots idle; see BENCHMARKS.md
    threads: int | None = None
    ray: bool = False  # engine actors on a Ray cluster (gpt2serve.scale.batch)
    replicas: int | None = None  # with ray: engine actors (default 1)
    ray_address: str | None = None  # with ray: the cluster (default: $RAY_ADDRESS, else a local instance)


class FatalLineError(Exception):
    """A line could not be answered for a reason that is not the line's (server gone, engine stopped):
    the job stops without writing it, so a rerun retries it."""


@dataclass
class Answer:
    record: dict
    tokens: int = 0
    failed: bool = False


# An answerer turns one decoded request into its answer (raising the server's errors) and its tokens.
Answerer = Callable[[Any], Awaitable[tuple[Any, int]]]


def iter_lines(stream: IO[bytes], skip: int = 0, first: int = 0) -> Iterator[tuple[int, bytes]]:
    """(index, line without its end) of each line of `stream` after the first `skip`; `first` is the
    index of the stream's first line."""
    for index, raw in enumerate(stream, first):
        if index >= skip:
            yield index, raw.rstrip(b"\n").rstrip(b"\r")


def read_lines(path: str, skip: int) -> Iterator[tuple[int, bytes]]:
    """(index, raw line) of each input line after the first `skip`; `-` is standard input."""
    stream = sys.stdin.buffer if path == "-" else open(path, "rb")
    try:
        yield from iter_lines(stream, skip)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def count_lines(path: str) -> int | None:
    if path == "-":
        return None
    with open(path, "rb") as f:
        data = f.read()
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def decode_line(raw: bytes, number: int) -> Any:
    """The line's JSON value, with the server's messages for an empty line, bad UTF-8 or bad JSON."""
    if not raw.strip():
        raise APIError(400, f"line {number} is empty; each line must hold one JSON request")
    return content.parse_json(content.decode_body(raw), line=number)


def _error_body(exc: BaseException) -> dict:
    from gpt2serve.api.errors import describe

    if isinstance(exc, RemoteError):
        return exc.body
    return describe(exc).body


class RemoteError(Exception):
    """A server's error answer for one line; `body` is its `{"error": ...}` envelope."""

    def __init__(self, body: dict):
        super().__init__(str(body.get("error", {}).get("message", body)))
        self.body = body


def is_openai(body: Any) -> bool:
    """An OpenAI-style completion request: `prompt` and no `input`."""
    return isinstance(body, dict) and "prompt" in body and "input" not in body


async def answer_line(index: int, raw: bytes, answer: Answerer) -> Answer:
    record: dict[str, Any] = {}
    try:
        body = decode_line(raw, index + 1)
        if isinstance(body, str):  # a bare prompt
            body = {"input": body}
        if isinstance(body, dict) and "id" in body:
            record["id"] = body["id"]
        output, tokens = await answer(body)
    except FatalLineError:
        raise
    except Exception as exc:
        record.update(_error_body(exc))
        return Answer(record, failed=True)
    record["output"] = output
    return Answer(record, tokens)


async def run_lines(
    lines: Iterator[tuple[int, bytes]], answer: Answerer, writer: OrderedWriter, concurrency: int,
    progress: Progress,
) -> None:  # fmt: skip
    """Answer every line with at most `concurrency` in flight, writing each in order as it can be; a
    FatalLineError stops the feeding, and is raised once the lines in flight have ended."""
    slots, room = asyncio.Semaphore(concurrency), asyncio.Condition()
    window = concurrency * WINDOW_PER_SLOT
    failures: list[BaseException] = []
    tasks: set[asyncio.Task] = set()

    async def one(index: int, raw: bytes) -> None:
        try:
            result = await answer_line(index, raw, answer)
            writer.put(index, result.record)
            progress.update(result.tokens, result.failed)
        except Exception as exc:
            failures.append(exc)
        finally:
            slots.release()
            async with room:
                room.notify_all()

    try:
        for index, raw in lines:
            await slots.acquire()
            async with room:
                await room.wait_for(lambda i=index: failures or i - writer.next < window)
            if failures:
                break
            task = asyncio.ensure_future(one(index, raw))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        writer.sync()
    if failures:
        raise failures[0]


def local_answerer(options: BatchOptions) -> tuple[Answerer, Callable[[], None], int]:
    """Load the engine once; the answerer, a close function, and the default concurrency."""
    from gpt2serve.batch_local import LocalBatch

    local = LocalBatch.load(options)
    return local.answer, local.close, 2 * options.max_batch_size


def remote_answerer(options: BatchOptions) -> tuple[Answerer, Callable[[], Awaitable[None]], int]:
    from gpt2serve.batch_remote import RemoteBatch

    remote = RemoteBatch(options.url or "")
    return remote.answer, remote.close, 16


def refuse_output(options: BatchOptions, fd: int, done: ResumePoint, total: int | None) -> bool:
    """Whether the output has more lines than the input (said on standard error, `fd` closed)."""
    if total is None or done.lines <= total:
        return False
    print(f"error: {options.output} has {done.lines} lines, more than the {total} of {options.input}; "
          "is it another job's output?", file=sys.stderr)  # fmt: skip
    if fd != 1:
        os.close(fd)
    return True


@dataclass
class Job:
    """A job's output side, whichever mode answers its lines: the output file, its writer, the progress."""

    fd: int
    writer: OrderedWriter
    progress: Progress
    started: float = field(default_factory=time.monotonic)

    @classmethod
    def start(cls, fd: int, done: ResumePoint, total: int | None) -> Job:
        """The job continuing after the output's `done` lines (its clock starts now)."""
        return cls(fd, OrderedWriter(fd, done.lines), Progress(total, done.lines, done.failed))

    def stopped(self, exc: BaseException) -> int:
        self.progress.close()
        print(f"batch stopped after {self.writer.next} lines: {str(exc) or type(exc).__name__}; rerun the "
              "same command to continue", file=sys.stderr)  # fmt: skip
        return EXIT_STOPPED

    def finished(self) -> int:
        self.progress.close()
        self.progress.summary(time.monotonic() - self.started)
        return EXIT_LINES_FAILED if self.progress.failed else EXIT_OK

    def close(self) -> None:
        self.writer.sync()
        if self.fd != 1:
            os.close(self.fd)


async def _run(options: BatchOptions) -> int:
    fd, done = open_output(options.output)
    total = count_lines(options.input)
    if refuse_output(options, fd, done, total):
        return EXIT_STOPPED
    if options.url:
        answer, close, default = remote_answerer(options)
    else:
        answer, close_sync, default = local_answerer(options)

        async def close() -> None:
            close_sync()

    job = Job.start(fd, done, total)
    try:
        concurrency = options.concurrency or default
        lines = read_lines(options.input, done.lines)
        await run_lines(lines, answer, job.writer, concurrency, job.progress)
    except (FatalLineError, KeyboardInterrupt, asyncio.CancelledError) as exc:
        return job.stopped(exc)
    finally:
        await close()
        job.close()
    return job.finished()


def run_batch(options: BatchOptions) -> int:
    """Run the job; the exit status."""
    if options.ray:
        from gpt2serve.scale.batch import run_ray_batch  # ray is imported only here

        return run_ray_batch(options)
    try:
        return asyncio.run(_run(options))
    except KeyboardInterrupt:
        return EXIT_STOPPED
