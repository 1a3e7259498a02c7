"""Waiting for a SageMaker resource to reach a status, with its status and the time taken on standard
error: a tqdm status line on a terminal, else a plain line whenever the status changes."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from tqdm import tqdm

FAILED = ("Failed", "Stopped", "OutOfService", "RollingBack")


def wait(describe: Callable[[], dict], field: str, goal: str, what: str, poll_s: float) -> dict:
    """Poll `describe()` until `field` is `goal`; a failed status raises with its FailureReason."""
    from gpt2serve.sagemaker import SageMakerCommandError

    bar = tqdm(total=None, desc=what, bar_format="{desc} {elapsed}", file=sys.stderr,
               disable=not sys.stderr.isatty())  # fmt: skip
    last, started = None, time.monotonic()
    try:
        while True:
            described = describe()
            status = described[field]
            if status != last:
                last = status
                bar.set_description_str(f"{what}: {status}")
                if bar.disable:
                    print(f"{what}: {status} after {time.monotonic() - started:.0f} s", file=sys.stderr)
            if status == goal:
                return described
            if status in FAILED:
                reason = described.get("FailureReason") or "no reason given"
                raise SageMakerCommandError(f"{what} is {status}: {reason}")
            bar.refresh()
            time.sleep(poll_s)
    finally:
        bar.close()
