"""The engine: one thread owns the model and runs every request in one batched decode loop.

Each iteration: admit waiting requests, run one decode step over every active sequence of every running
request (new prompts join its pass over the weights while the rows fit decode.c; the others are
prefilled first, in groups that fit it), choose the next tokens (sampling rows and beam groups), and
retire what finished. Callers submit from any thread (`submit`, its checks in intake.py) and get results
through `generate()` (asyncio) or `generate_sync()`, both by bridge.py. Choosing tokens is chooser.py's
(`advance`), a beam request's step beams.py's, and the forward path and its chooser step_path.py's.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from gpt2serve.engine.bridge import generate_sync
from gpt2serve.engine.build import EngineStats, build_model, load_and_build, lower_thread_priority, placement
from gpt2serve.engine.chooser import advance
from gpt2serve.engine.config import EngineConfig
from gpt2serve.engine.errors import EngineStoppedError, RequestTimeoutError
from gpt2serve.engine.intake import Intake
from gpt2serve.engine.loader import LoadedModel
from gpt2serve.engine.params import SamplingParams
from gpt2serve.engine.request import GenerationResult, Request, Row, Sequence
from gpt2serve.engine.step_path import StepPath

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        self.device, self.dtype = placement(self.config)
        self.model_name, self.is_random = loaded.name, loaded.is_random
        self.model_config, self.tokenizer = loaded.config, loaded.tokenizer
        self.model, self.cache, self.scheduler = build_model(loaded, self.config, self.device, self.dtype)
        self.path = StepPath.of(self.model, self.cache, self.config, self.device)  # forward and chooser
        self.intake = Intake(self.tokenizer, loaded.config.n_positions, self.config, self.device)
        self.stats = EngineStats()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    @classmethod
    def load(cls, model: str, config: EngineConfig | None = None) -> Engine:
        """Load a checkpoint (directory, hub id or random:<size>) and build an engine for it."""
        config = config or EngineConfig()
        return load_and_build(model, config, lambda loaded: cls(loaded, config))

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="gpt2serve-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still waiting or running end with EngineStoppedError."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- submission --------------------------------------------------------------------------------
    def submit(
        self,
        prompt: str,
        params: SamplingParams,
        sink: Callable[[object], None],
        stream: bool,
        prompt_ids: list[int] | None = None,
        deadline: float | None = None,
    ) -> Request:
        """Validate and queue a request; `sink` receives StreamDeltas (if `stream`), then a
        GenerationResult or an exception. Raises InvalidParameterError or EngineOverloadedError at once.
        `prompt_ids`: the prompt already encoded (`encode_async`); `deadline`: a time.monotonic() by
        which it must end (default: request_timeout_s from now)."""
        if not self.running:
            raise EngineStoppedError("the engine is not running")
        req = self.intake.request(prompt, params, sink, stream, prompt_ids, deadline)
        with self._cond:
            self.scheduler.add(req)
            self._cond.notify()
        return req

    def generate_sync(self, prompt: str, params: SamplingParams) -> GenerationResult:
        """The request's result, waited for on the calling thread (see bridge.py)."""
        return generate_sync(self, prompt, params)

    # -- the loop ----------------------------------------------------------------------------------
    def _run(self) -> None:
        lower_thread_priority(self.config.engine_nice)
        while True:
            with self._cond:
                while not (self._stopping or self.scheduler.waiting or self.scheduler.running):
                    self._cond.wait(timeout=1.0)
                if self._stopping:
                    break
                self._drop_cancelled_and_expired()
                admitted = self.scheduler.admit()
            decoding = [r for r in self.scheduler.running if r not in admitted]
            joining, groups = self.scheduler.group_prompts(decoding, admitted, self.path.joins)
            for group in groups:
                self._step_isolated([], group)
            if decoding or joining:
                self._step_isolated(decoding, joining)
        with self._cond:
            for req in [*self.scheduler.waiting, *self.scheduler.running]:
                self._finish(req, error=EngineStoppedError("the server is shutting down"))

    def _step_isolated(self, decoding: list[Request], prompts: list[Request]) -> None:
        """`_step`, where a failure fails only the request that causes it: the step is run again for
        each request alone (the cache positions it wrote are written again with the same values), so
        the others continue token for token as if the failing one had never joined."""
        try:
            self._step(decoding, prompts)
        except Exception as exc:  # a bug or a poisoned row must fail its own request, never the loop
            if len(decoding) + len(prompts) == 1:
                self._finish([*decoding, *prompts][0], error=exc)
                return
            log.warning(
                "a step of %d requests failed (%r); running each alone", len(decoding) + len(prompts), exc
            )
            for req in decoding:
                self._step_isolated([req], [])
            for req in prompts:
                self._step_isolated([], [req])

    def _drop_cancelled_and_expired(self) -> None:
        now = time.monotonic()
        for req in [*self.scheduler.waiting, *self.scheduler.running]:
            if req.cancelled.is_set():
                self.scheduler.finish(req)
                self.stats.requests_cancelled += 1
            elif req.deadline is not None and now > req.deadline:
                limit = self.config.request_timeout_s or 0
                self._finish(req, error=RequestTimeoutError(f"the request ran past its {limit:g} s deadline"))

    def _finish(self, req: Request, error: Exception | None = None) -> None:
        with self._cond:
            self.scheduler.finish(req)
        if error is not None:
            if not isinstance(error, (EngineStoppedError, RequestTimeoutError)):
                log.error("generation failed for request %s", req.id, exc_info=error)
            self.stats.requests_failed += 1
            req.sink(error)
        else:
            self.stats.requests_finished += 1
            req.sink(req.result())

    # -- one step -------------------------------------------------------------------------------
    def _step(self, decoding: list[Request], prompts: list[Request]) -> None:
        """One forward (`StepPath.forward`): a token for every active sequence of `decoding`,
        and the prompts of `prompts` (see `Scheduler.group_prompts`), then each row's next token."""
        rows = [(r, s) for r in decoding for s in r.active]
        rows.sort(key=lambda row: row[1].slot)  # consecutive slots let attention read cache views
        for req in prompts:
            req.start(self.tokenizer)
        logits = self.path.forward(rows, prompts)
        self.stats.count_prefills([len(req.prompt_ids) for req in prompts], in_step=bool(rows))
        for i, req in enumerate(prompts):  # a prompt's logits serve each of its request's sequences
            n = len(req.sequences)
            self._advance([(req, s) for s in req.sequences], logits[len(rows) + i].expand(n, -1))
        if rows:
            self.stats.count_step(len(rows))
            self._advance(rows, logits[: len(rows)])

    def _advance(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Each row's next token (chooser.advance), then retire what finished; a request whose choice
        failed fails alone."""
        failed = advance(rows, logits, self.cache, self.tokenizer, self._release, self.path.chooser)
        for req in {id(r): r for r, _ in rows}.values():
            if req.id in failed:
                self._finish(req, error=failed[req.id])
            elif not req.active:
                self._finish(req)

    def _release(self, req: Request, seq: Sequence) -> None:
        with self._cond:
            self.scheduler.release_slot(req, seq.slot)
