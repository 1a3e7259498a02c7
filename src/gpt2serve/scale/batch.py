"""`gpt2serve batch INPUT -o OUTPUT --ray`: the lines of a batch job spread over engine actors by Ray Data.

The lines are numbered before any actor runs: this process reads the input once (a local path or any
filesystem URL pyarrow reads, such as `s3://bucket/prompts.jsonl`), counts its lines and cuts the part
after the output's complete lines into blocks of consecutive lines, each known by its first line's index
and its byte range (no step of the pipeline but the actors needs a CPU, so actors holding every CPU
cannot starve it). Ray Data hands the blocks, one per call, to `--replicas` actors; each holds one engine
(`gpt2serve.batch_local.LocalBatch`, through the engine's asyncio bridge), reads its block's bytes and
answers every line exactly as the local job does (`gpt2serve.batch.answer_line`: the server's parsing,
limits, messages and answers, the raw bytes so bad UTF-8 gets the same error record; the same seeded
text). An actor answers two blocks at once, so `--concurrency` requests (default 2 x `--max-batch-size`)
stay in flight on each engine, as locally. A local path must be readable where the actors run (one
machine, or a shared filesystem); a URL is read from every node.

The answers come back here in input order (Ray Data's `preserve_order`) and go through the local job's
output side (`gpt2serve.batch.Job`: whole lines, in order, fsync'ed, resumable, the same tqdm progress
and exit status). An actor process that dies is restarted by Ray Data and its unfinished blocks sent
again (their answers were never returned, so none is written twice); a job that stops (an engine that
fails, Ctrl-C) keeps the lines written, and a rerun continues.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import sys
from dataclasses import replace
from typing import Any

import numpy as np

from gpt2serve.batch import EXIT_STOPPED, BatchOptions, Job, answer_line, iter_lines, refuse_output
from gpt2serve.batch_output import encode_record, open_output

logger = logging.getLogger(__name__)

SCAN_BYTES = 1 << 22  # read size of the numbering pass
CALLS_PER_ACTOR = 2  # blocks an actor answers at once: its engine stays full while one block ends
INDEX = "index"


def open_input(path: str) -> Any:
    """The input as a pyarrow random-access file: a URL through its filesystem, else a local path."""
    from pyarrow import fs

    if "://" in path:
        filesystem, where = fs.FileSystem.from_uri(path)
    else:
        filesystem, where = fs.LocalFileSystem(), os.path.abspath(path)
    return filesystem.open_input_file(where)


def line_starts(path: str, skip: int, every: int) -> tuple[list[int], int, int]:
    """Byte offsets of lines skip, skip + every, ...; the number of lines; the size in bytes."""
    starts = [0] if skip == 0 else []
    wanted = skip + every if skip == 0 else skip
    ends = size = 0  # newlines seen (the index of the line after the last), bytes read
    last = b"\n"
    with open_input(path) as f:
        while data := f.read(SCAN_BYTES):
            newlines = np.flatnonzero(np.frombuffer(data, np.uint8) == ord("\n"))
            while wanted <= ends + len(newlines):  # line `wanted` starts after newline `wanted - 1`
                starts.append(size + int(newlines[wanted - ends - 1]) + 1)
                wanted += every
            ends, size, last = ends + len(newlines), size + len(data), data[-1:]
    lines = ends + (last != b"\n")
    return [s for s in starts if s < size], lines, size


def plan_blocks(path: str, skip: int, lines_per_block: int) -> tuple[list[dict], int]:
    """The blocks of lines after the first `skip` (first line's index, byte offset, byte size), and the
    input's number of lines."""
    starts, lines, size = line_starts(path, skip, lines_per_block)
    ends = [*starts[1:], size]
    blocks = [{"first": skip + k * lines_per_block, "offset": start, "size": end - start}
              for k, (start, end) in enumerate(zip(starts, ends))]  # fmt: skip
    return blocks, lines


def read_blocks(path: str, blocks: dict[str, np.ndarray]) -> list[tuple[int, bytes]]:
    """(index, raw line) of each line of the planned blocks."""
    lines: list[tuple[int, bytes]] = []
    with open_input(path) as f:
        for first, offset, size in zip(blocks["first"], blocks["offset"], blocks["size"]):
            stream = io.BytesIO(f.read_at(int(size), int(offset)))
            lines.extend(iter_lines(stream, first=int(first)))
    return lines


class EngineActor:
    """One Ray actor's engine, loaded once: reads the blocks it is given and answers each line as the
    local job does; one row per line (its index, its encoded output record, tokens, failed)."""

    def __init__(self, options: BatchOptions):
        from gpt2serve.batch_local import LocalBatch

        self.path = options.input
        self.local = LocalBatch.load(options)

    async def __call__(self, blocks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        lines = await asyncio.to_thread(read_blocks, self.path, blocks)
        answers = await asyncio.gather(*(answer_line(i, raw, self.local.answer) for i, raw in lines))
        return {
            INDEX: np.array([i for i, _ in lines], dtype=np.int64),
            "record": np.array([encode_record(a.record) for a in answers], dtype=object),
            "tokens": np.array([a.tokens for a in answers], dtype=np.int64),
            "failed": np.array([a.failed for a in answers], dtype=bool),
        }


def actor_options(options: BatchOptions) -> BatchOptions:
    """What each actor's engine is given: `--threads` threads (default 1), room for the lines in flight."""
    return replace(options, threads=options.threads or 1, concurrency=in_flight(options))


def in_flight(options: BatchOptions) -> int:
    """Requests in flight on each engine, as in the local job."""
    return options.concurrency or 2 * options.max_batch_size


def lines_per_block(options: BatchOptions) -> int:
    return max(1, in_flight(options) // CALLS_PER_ACTOR)


def answers(options: BatchOptions, blocks: list[dict]) -> Any:
    """The dataset of answers, in input order: the planned blocks, one at a time, through the actors."""
    import ray

    actors = options.replicas or 1
    pool = ray.data.ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=CALLS_PER_ACTOR)
    planned = ray.data.from_items(blocks, override_num_blocks=len(blocks))
    return planned.map_batches(
        EngineActor, fn_constructor_args=(actor_options(options),), batch_size=1, batch_format="numpy",
        compute=pool, num_cpus=actor_options(options).threads,
    )  # fmt: skip


def connect(options: BatchOptions) -> bool:
    """Join the cluster (or start a local instance); whether this job did (and so must leave it)."""
    from gpt2serve.scale.cluster import import_ray, join

    ray = import_ray("data")
    if ray.is_initialized():  # a caller joined one already
        return False
    join(options.ray_address, "warning", "data", include_dashboard=False)
    return True


def configure_data() -> None:
    """Answers in input order; no progress bars but the job's own."""
    import ray

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def write_answers(dataset: Any, job: Job) -> None:
    for batch in dataset.iter_batches(batch_format="numpy", batch_size=None):
        columns = (batch[INDEX], batch["record"], batch["tokens"], batch["failed"])
        for index, record, tokens, failed in zip(*columns):
            job.writer.put_line(int(index), bytes(record))
            job.progress.update(int(tokens), bool(failed))


def last_line(exc: BaseException) -> str:
    """The gist of an error Ray passes on (its text ends with the cause, after the remote traceback)."""
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else type(exc).__name__


def run_ray_batch(options: BatchOptions) -> int:
    """Run the job on Ray; the exit status (as the local job's)."""
    from gpt2serve.scale.cluster import RayUnavailableError

    if options.input == "-":
        print("error: batch --ray reads a file or URL, not standard input", file=sys.stderr)
        return EXIT_STOPPED
    fd, done = open_output(options.output)
    try:
        blocks, total = plan_blocks(options.input, done.lines, lines_per_block(options))
        if refuse_output(options, fd, done, total):
            return EXIT_STOPPED
        joined = connect(options)
    except (RayUnavailableError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if fd != 1:
            os.close(fd)
        return EXIT_STOPPED
    configure_data()
    job = Job.start(fd, done, total)
    try:
        if blocks:
            write_answers(answers(options, blocks), job)
    except (Exception, KeyboardInterrupt) as exc:
        logger.debug("the Ray job stopped", exc_info=True)
        return job.stopped(RuntimeError(last_line(exc)))
    finally:
        job.close()
        if joined:
            import ray

            ray.shutdown()
    return job.finished()
