"""`gpt2serve batch INPUT -o OUTPUT --ray`: a batch job whose lines Ray Data spreads over engine actors.

Ray Data reads the input's lines (`read_text`: a local path or any filesystem URL pyarrow reads, such as
`s3://bucket/prompts.jsonl`), numbers them (zipped with a range: the line's index is its id in the
job), and maps batches of `--max-batch-size` lines through `--replicas` engine actors. Each actor loads
the model once and answers a line exactly as the local job does (`gpt2serve.batch.answer_line` over
`gpt2serve.batch_local.LocalBatch`: the server's parsing, limits, messages and answers); its `__call__`
is a coroutine, so Ray Data gives each actor several batches at once and the engine's decode steps stay
full across batch boundaries.

The answers come back to this process and are written by the local job's writer
(`gpt2serve.batch_output`): output line i answers input line i, whole lines only, fsync'ed, resumable
(a rerun skips the complete lines already written: the actors drop those lines unanswered). Exit status
as the local job: 0, 1 when some line got an error record, 2 when the job stopped early.

UNFINISHED: on a 2-CPU local cluster with 2 one-CPU actors the job stalls (Ray Data's ReadRange task of
the zip waits for a CPU the actors hold); not yet tested.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from typing import Any

import numpy as np

from gpt2serve.batch import EXIT_LINES_FAILED, EXIT_OK, EXIT_STOPPED, BatchOptions, answer_line
from gpt2serve.batch_output import OrderedWriter, open_output
from gpt2serve.batch_progress import Progress

logger = logging.getLogger(__name__)

LINE, INDEX = "text", "id"  # the columns of read_text and range


def record_json(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


class EngineActor:
    """One Ray actor's engine: loaded once, answering batches of (index, line) rows."""

    def __init__(self, options: BatchOptions, skip: int):
        from gpt2serve.batch_local import LocalBatch

        self.local = LocalBatch.load(options)
        self.skip = skip

    async def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [(int(i), str(line)) for i, line in zip(batch[INDEX], batch[LINE]) if i >= self.skip]
        answer = self.local.answer
        answers = await asyncio.gather(*(answer_line(i, line.encode(), answer) for i, line in rows))
        return {
            INDEX: np.array([i for i, _ in rows], dtype=np.int64),
            "record": np.array([record_json(a.record) for a in answers], dtype=object),
            "tokens": np.array([a.tokens for a in answers], dtype=np.int64),
            "failed": np.array([a.failed for a in answers], dtype=bool),
        }


def numbered_lines(path: str) -> tuple[Any, int]:
    """The input's lines with their index, and how many there are."""
    import ray

    # Reading text is light: it must not wait for a CPU the engine actors hold.
    lines = ray.data.read_text(path, drop_empty_lines=False, ray_remote_args={"num_cpus": 0})
    total = lines.count()
    return lines.zip(ray.data.range(total)), total


def answers(options: BatchOptions, lines: Any, skip: int) -> Any:
    """The dataset of answers: `--replicas` actors of `--threads` CPUs each."""
    threads = options.threads or 1
    actor_options = BatchOptions(**{**options.__dict__, "threads": threads})
    return lines.map_batches(
        EngineActor, fn_constructor_args=(actor_options, skip), batch_size=options.max_batch_size,
        batch_format="numpy", concurrency=options.replicas or 1, num_cpus=threads,
    )  # fmt: skip


def connect(options: BatchOptions) -> None:
    from gpt2serve.scale.serve import RayUnavailableError, import_ray

    ray = import_ray()
    if ray.is_initialized():
        return
    try:
        ray.init(address=options.ray_address, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayUnavailableError(f"cannot reach the Ray cluster {options.ray_address!r}: {exc}") from None
    ray.data.DataContext.get_current().execution_options.preserve_order = True


def write_answers(dataset: Any, writer: OrderedWriter, progress: Progress) -> None:
    for batch in dataset.iter_batches(batch_format="numpy", batch_size=None):
        columns = (batch[INDEX], batch["record"], batch["tokens"], batch["failed"])
        for index, record, tokens, failed in zip(*columns):
            writer.put(int(index), json.loads(record))
            progress.update(int(tokens), bool(failed))


def run_ray_batch(options: BatchOptions) -> int:
    """Run the job on Ray; the exit status."""
    from gpt2serve.scale.serve import RayUnavailableError

    if options.input == "-":
        print("error: batch --ray reads a file or URL, not standard input", file=sys.stderr)
        return EXIT_STOPPED
    try:
        connect(options)
        lines, total = numbered_lines(options.input)
    except (RayUnavailableError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_STOPPED
    fd, done = open_output(options.output)
    if done.lines > total:
        print(f"error: {options.output} has {done.lines} lines, more than the {total} of {options.input}; "
              "is it another job's output?", file=sys.stderr)  # fmt: skip
        return EXIT_STOPPED
    progress = Progress(total, done.lines, done.failed)
    writer = OrderedWriter(fd, done.lines)
    started = time.monotonic()
    try:
        write_answers(answers(options, lines, done.lines), writer, progress)
    except (Exception, KeyboardInterrupt) as exc:
        progress.close()
        print(f"batch stopped after {writer.next} lines: {exc or type(exc).__name__}; rerun the same "
              "command to continue", file=sys.stderr)  # fmt: skip
        return EXIT_STOPPED
    finally:
        writer.sync()
        if fd != 1:
            os.close(fd)
    progress.close()
    progress.summary(time.monotonic() - started)
    return EXIT_LINES_FAILED if progress.failed else EXIT_OK
