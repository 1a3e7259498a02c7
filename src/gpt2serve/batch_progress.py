"""Progress of a batch job on standard error: a tqdm bar on a terminal (lines done/total, ETA,
generated tokens/s, errors), else a plain line every `EVERY_S` seconds; a summary at the end."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

EVERY_S = 10.0


class Progress:
    def __init__(self, total: int | None, done: int = 0, failed: int = 0, every_s: float = EVERY_S):
        self.total, self.done, self.failed = total, done, failed
        self.tokens, self.new_lines = 0, 0
        self._started = self._last = time.monotonic()
        self._every_s = every_s
        self._bar = None
        if sys.stderr.isatty():
            self._bar = tqdm(total=total, initial=done, unit="line", file=sys.stderr, dynamic_ncols=True)
            self._bar.set_postfix_str(self._postfix(), refresh=False)

    def _rate(self) -> float:
        return self.tokens / max(time.monotonic() - self._started, 1e-9)

    def _postfix(self) -> str:
        return f"{self._rate():.0f} tok/s, {self.failed} errors"

    def update(self, tokens: int, failed: bool) -> None:
        self.done += 1
        self.new_lines += 1
        self.tokens += tokens
        self.failed += failed
        now = time.monotonic()
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._bar.update(1)
        elif now - self._last >= self._every_s:
            self._last = now
            line = f"batch: {self._done_text()}, {self._postfix()}{self._eta(now)}"
            print(line, file=sys.stderr, flush=True)

    def _done_text(self) -> str:
        if self.total:
            return f"{self.done}/{self.total} lines ({100 * self.done / self.total:.0f}%)"
        return f"{self.done} lines"

    def _eta(self, now: float) -> str:
        if not self.total or not self.new_lines:
            return ""
        left = (self.total - self.done) * (now - self._started) / self.new_lines
        return f", ETA {time.strftime('%H:%M:%S', time.gmtime(left))}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def summary(self, elapsed_s: float) -> None:
        ok = self.done - self.failed
        print(f"batch: {self.done} lines ({self.new_lines} this run): {ok} answered, {self.failed} errors; "
              f"{self.tokens} tokens generated in {elapsed_s:.1f} s ({self._rate():.0f} tok/s)",
              file=sys.stderr, flush=True)  # fmt: skip
