"""The engine: one thread owns the model and runs every request in one batched decode loop.

Each iteration: admit waiting requests, run one decode step over every active sequence of every running
request (new prompts join its pass over the weights while the rows fit decode.c; the others are
prefilled first, in groups that fit it), choose the next tokens (sampling rows and beam groups), and
retire what finished. Callers submit from any thread and get results through `generate()`, `stream()`
(asyncio) or `generate_sync()`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gpt2serve.engine import sampling
from gpt2serve.engine.config import EngineConfig
from gpt2serve.engine.errors import (
    EngineStoppedError,
    InvalidParameterError,
    NonFiniteLogitsError,
    RequestTimeoutError,
)
from gpt2serve.engine.loader import LoadedModel, load_checkpoint, returning_freed_memory
from gpt2serve.engine.model import GPT2, make_batch
from gpt2serve.engine.params import SamplingParams, require
from gpt2serve.engine.request import (
    CompletionOutput,
    GenerationResult,
    Request,
    Sequence,
    StreamDelta,
    TokenLogprob,
)
from gpt2serve.engine.scheduler import Scheduler
from gpt2serve.engine.usage import current_meter, metered

log = logging.getLogger(__name__)

# The dtype checkpoints are read in for each weight format (int8 quantizes from float32, one tensor at a
# time: reading bfloat16 instead would cost 1.5 points of top-1 agreement).
LOAD_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.float32,
}

INLINE_ENCODE_CHARS = 4096  # prompts up to this long are tokenized in the caller's thread (< 1 ms)


@dataclass
class EngineStats:
    steps: int = 0  # decode steps
    decoded_tokens: int = 0  # sequences advanced by decode steps
    max_step_batch: int = 0  # the most sequences one decode step ran
    prefills: int = 0
    prefill_tokens: int = 0
    prefills_in_step: int = 0  # of the prefills, those run inside a decode step
    requests_finished: int = 0
    requests_failed: int = 0
    requests_cancelled: int = 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        self.device = resolve_device(self.config.device)
        self.dtype = self.config.dtype or ("float16" if self.device.type == "cuda" else "float32")
        self.model_name, self.is_random = loaded.name, loaded.is_random
        self.model_config, self.tokenizer = loaded.config, loaded.tokenizer
        self.model = GPT2(loaded.config, loaded.state_dict, self.dtype, self.device, self.config.cpu_kernels)
        n_slots = self._slots_that_fit()
        self.cache = self.model.new_cache(n_slots)
        max_tokens = self.config.max_total_tokens or n_slots * loaded.config.n_positions
        per_request = max(1, math.ceil(n_slots * self.config.max_request_share))
        self.scheduler = Scheduler(n_slots, self.config.max_queue, max_tokens, per_request)
        self.stats = EngineStats()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def _slots_that_fit(self) -> int:
        """max_batch_size, or fewer where that many full-context KV slots exceed kv_cache_gb."""
        cfg = self.model_config
        per_slot = 2 * cfg.n_layer * cfg.n_positions * cfg.n_embd * self.model.act_dtype.itemsize
        fit = max(1, int(self.config.kv_cache_gb * 2**30 // per_slot))
        if fit < self.config.max_batch_size:
            log.warning(
                "KV cache: %d slots of %d MB fit in %.1f GB (max_batch_size %d); --kv-cache-gb for more",
                fit,
                per_slot >> 20,
                self.config.kv_cache_gb,
                self.config.max_batch_size,
            )
        return min(self.config.max_batch_size, fit)

    @classmethod
    def load(cls, model: str, config: EngineConfig | None = None) -> Engine:
        """Load a checkpoint (directory, hub id or random:<size>) and build an engine for it."""
        config = config or EngineConfig()
        device = resolve_device(config.device)
        dtype = config.dtype or ("float16" if device.type == "cuda" else "float32")
        if dtype not in LOAD_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(LOAD_DTYPES)}, got {dtype!r}")

        def build() -> Engine:
            # The checkpoint is read lazily: each tensor is read when the model packs it, then dropped.
            with returning_freed_memory():
                return cls(load_checkpoint(model, dtype=LOAD_DTYPES[dtype]), config)

        # Built in a short-lived thread: OpenMP keeps a worker pool per calling thread, and a pool left
        # in the caller's thread makes the engine thread's workers sleep between parallel regions
        # instead of spinning (10-20 % slower decode steps, measured on 2 cores).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpt2serve-load") as pool:
            return pool.submit(build).result()

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
    @property
    def max_prompt_tokens(self) -> int:
        context = self.model_config.n_positions
        return min(self.config.max_prompt_tokens or context - 1, context - 1)

    def encode(self, prompt: str) -> list[int]:
        """The prompt's token ids, or InvalidParameterError naming the limit. A prompt longer than the
        limit can hold (every token covers at most `max_token_chars` characters) is refused before
        tokenizing it."""
        limit = self.max_prompt_tokens
        most = limit * self.tokenizer.max_token_chars
        require(
            len(prompt) <= most,
            "prompt",
            f"`prompt` is {len(prompt)} characters: more than the {limit} tokens this server takes can hold "
            f"(at most {most} characters)",
        )
        try:
            ids = self.tokenizer.encode(prompt)
        except (TypeError, ValueError) as exc:  # e.g. a lone surrogate, which UTF-8 cannot encode
            raise InvalidParameterError("prompt", f"`prompt` cannot be tokenized: {exc}") from None
        context = self.model_config.n_positions
        why = f" (the model's context is {context})" if limit == context - 1 else " (--max-prompt-tokens)"
        require(len(ids) <= limit, "prompt", f"`prompt` is {len(ids)} tokens; at most {limit}{why}")
        return ids

    async def encode_async(self, prompt: str) -> list[int]:
        """`encode` off the event loop for a long prompt (tokenizing 100k characters takes ~40 ms)."""
        if len(prompt) <= INLINE_ENCODE_CHARS:
            return self.encode(prompt)
        return await asyncio.to_thread(self.encode, prompt)

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
        longest = self.config.max_stop_length
        for stop in params.stop:
            require(
                len(stop) <= longest,
                "stop",
                f"a `stop` string may be at most {longest} characters, got one of {len(stop)}",
            )
        if prompt_ids is None:
            prompt_ids = self.encode(prompt) if prompt else []
        budget = params.new_token_budget(len(prompt_ids), self.model_config.n_positions)
        if deadline is None and self.config.request_timeout_s is not None:
            deadline = time.monotonic() + self.config.request_timeout_s
        meter = current_meter.get()  # the caller's, where the HTTP layer meters its key's usage
        if meter is not None:
            sink = metered(sink, meter)
        req = Request(prompt, prompt_ids, params, budget, sink, stream, deadline)
        with self._cond:
            self.scheduler.add(req)
            self._cond.notify()
        return req

    async def generate(
        self, prompt: str, params: SamplingParams, deadline: float | None = None
    ) -> GenerationResult:
        async for item in self._items(prompt, params, stream=False, deadline=deadline):
            return item
        raise EngineStoppedError("the engine ended the request without a result")

    async def stream(
        self, prompt: str, params: SamplingParams
    ) -> AsyncIterator[StreamDelta | GenerationResult]:
        """Yield StreamDeltas as text is made, then the whole GenerationResult."""
        async for item in self._items(prompt, params, stream=True):
            yield item

    async def _items(self, prompt: str, params: SamplingParams, stream: bool, deadline: float | None = None):
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def sink(item: object) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the caller's loop is gone
                req.cancel()

        ids = await self.encode_async(prompt) if prompt else []
        req = self.submit(prompt, params, sink, stream, prompt_ids=ids, deadline=deadline)
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, GenerationResult):
                    return
        finally:
            req.cancel()  # a caller that went away frees its slots at the next step

    def generate_sync(self, prompt: str, params: SamplingParams) -> GenerationResult:
        q: queue.Queue = queue.Queue()
        req = self.submit(prompt, params, q.put, stream=False)
        try:
            item = q.get()
        finally:
            req.cancel()
        if isinstance(item, BaseException):
            raise item
        return item

    # -- the loop ----------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self.scheduler.waiting or self.scheduler.running):
                    self._cond.wait(timeout=1.0)
                if self._stopping:
                    break
                self._drop_cancelled_and_expired()
                admitted = self.scheduler.admit()
            decoding = [r for r in self.scheduler.running if r not in admitted]
            joining, groups = self._group_prompts(decoding, admitted)
            for group in groups:
                self._step_isolated([], group)
            if decoding or joining:
                self._step_isolated(decoding, joining)
        self._abort_all(EngineStoppedError("the server is shutting down"))

    def _step_isolated(self, decoding: list[Request], prompts: list[Request]) -> None:
        """`_step`, where a failure fails only the request that causes it: the step is run again for
        each request alone (the cache positions it wrote are written again with the same values), so
        the others continue token for token as if the failing one had never joined."""
        try:
            self._step(decoding, prompts)
        except Exception as exc:  # a bug or a poisoned row must fail its own request, never the loop
            if len(decoding) + len(prompts) == 1:
                self._fail([*decoding, *prompts], exc)
                return
            log.warning(
                "a step of %d requests failed (%r); running each alone", len(decoding) + len(prompts), exc
            )
            for req in decoding:
                self._step_isolated([req], [])
            for req in prompts:
                self._step_isolated([], [req])

    def _fail(self, reqs: list[Request], exc: Exception) -> None:
        log.error("generation failed for request(s) %s", [r.id for r in reqs], exc_info=exc)
        for r in reqs:
            self._finish(r, error=exc)

    def _drop_cancelled_and_expired(self) -> None:
        now = time.monotonic()
        for req in [*self.scheduler.waiting, *self.scheduler.running]:
            if req.cancelled.is_set():
                self.scheduler.finish(req)
                self.stats.requests_cancelled += 1
            elif req.deadline is not None and now > req.deadline:
                limit = self.config.request_timeout_s or 0
                self._finish(req, error=RequestTimeoutError(f"the request ran past its {limit:g} s deadline"))

    def _abort_all(self, error: Exception) -> None:
        with self._cond:
            for req in [*self.scheduler.waiting, *self.scheduler.running]:
                self._finish(req, error=error)

    def _finish(self, req: Request, error: Exception | None = None) -> None:
        with self._cond:
            self.scheduler.finish(req)
        if error is not None:
            self.stats.requests_failed += 1
            req.sink(error)
        else:
            self.stats.requests_finished += 1
            req.sink(req.result())

    # -- model steps -------------------------------------------------------------------------------
    def _group_prompts(
        self, decoding: list[Request], admitted: list[Request]
    ) -> tuple[list[Request], list[list[Request]]]:
        """Which new prompts run in which forward: those that fit decode.c beside the decode rows join
        the decode step (one pass over the weights for both), the others go in groups that fit it, and
        a prompt too long for it alone runs on its own. Returns (joining, groups), oldest first."""
        rows = sum(len(r.active) for r in decoding)
        joining, groups, group_rows = [], [], 0
        for req in admitted:
            n = len(req.prompt_ids)
            if self.model.takes_rows(rows + n, self.cache):
                joining.append(req)
                rows += n
            elif groups and self.model.takes_rows(group_rows + n, self.cache):
                groups[-1].append(req)
                group_rows += n
            else:
                groups.append([req])
                group_rows = n
        return joining, groups

    def _prefilled(self, req: Request, logits: torch.Tensor) -> None:
        """After the prompt ran in the request's first slot: copy its cache to the others, pick tokens."""
        first, others = req.sequences[0], req.sequences[1:]
        self.cache.copy_slots([first.slot] * len(others), [s.slot for s in others], len(req.prompt_ids))
        self.stats.prefills += 1
        self.stats.prefill_tokens += len(req.prompt_ids)
        self._advance([(req, s) for s in req.sequences], logits.expand(len(req.sequences), -1))

    def _step(self, decoding: list[Request], prompts: list[Request]) -> None:
        """One forward: a token for every active sequence of `decoding`, and the prompts of `prompts`
        (see `_group_prompts`: together on decode.c, or one prompt alone)."""
        rows = [(r, s) for r in decoding for s in r.active]
        rows.sort(key=lambda row: row[1].slot)  # consecutive slots let attention read cache views
        tokens = [s.history[-1] for _, s in rows]
        slots = [s.slot for _, s in rows]
        positions = [len(s.history) - 1 for _, s in rows]
        top = _logits_read(decoding + prompts)
        prompt_rows = sum(len(req.prompt_ids) for req in prompts)
        if prompts and not self.model.takes_rows(len(rows) + prompt_rows, self.cache):
            (req,) = prompts  # one prompt alone (see _group_prompts): the model's own prefill
            req.start(self.tokenizer, self.device)
            batch = make_batch([req.prompt_ids], [req.sequences[0].slot], [0], self.device)
            self._prefilled(req, self.model(batch, self.cache, top=top)[0])
            return
        if prompts:
            picks = list(range(len(rows)))
            for req in prompts:
                req.start(self.tokenizer, self.device)
                n = len(req.prompt_ids)
                tokens += req.prompt_ids
                slots += [req.sequences[0].slot] * n
                positions += range(n)
                picks.append(len(tokens) - 1)  # the prompt's last position
            logits = self.model.forward_rows(tokens, slots, positions, picks, self.cache, top)
            self.stats.prefills_in_step += len(prompts) if rows else 0
            for i, req in enumerate(prompts):
                self._prefilled(req, logits[len(rows) + i])
            logits = logits[: len(rows)]
        elif rows and self.model.takes_rows(len(rows), self.cache):
            logits = self.model.forward_rows(tokens, slots, positions, None, self.cache, top)  # (B, V)
        elif rows:
            batch = make_batch([[t] for t in tokens], slots, positions, self.device)
            logits = self.model(batch, self.cache, top=top)  # (B, V)
        if not rows:
            return
        self.stats.steps += 1
        self.stats.decoded_tokens += len(rows)
        self.stats.max_step_batch = max(self.stats.max_step_batch, len(rows))
        self._advance(rows, logits)

    def _advance(self, rows: list[tuple[Request, Sequence]], logits: torch.Tensor) -> None:
        """Choose each row's next token, update the requests, retire what finished."""
        failed: dict[int, Exception] = {}
        plain = [i for i, (r, _) in enumerate(rows) if r.beam is None]
        if plain:
            picked = self._choose_isolated([rows[i] for i in plain], logits[plain])
            eos = self.tokenizer.eos_token_id
            for i, token in zip(plain, picked):
                req, seq = rows[i]
                if isinstance(token, Exception):
                    failed[req.id] = token
                elif req.id not in failed:
                    try:
                        self._append(req, seq, token, eos)
                    except Exception as exc:
                        failed[req.id] = exc
        beams: dict[int, tuple[Request, list[int]]] = {}
        for i, (r, _) in enumerate(rows):
            if r.beam is not None:
                beams.setdefault(r.id, (r, []))[1].append(i)
        for req, idx in beams.values():
            idx.sort(key=lambda i: rows[i][1].index)  # beam order
            try:
                self._beam_step(req, logits[idx])
            except Exception as exc:
                failed[req.id] = exc
        for req in {id(r): r for r, _ in rows}.values():
            if req.id in failed:
                self._fail([req], failed[req.id])
            elif not req.active:
                self._finish(req)

    def _append(self, req: Request, seq: Sequence, token: int, eos: int) -> None:
        req.append_token(seq, token, eos)
        if seq.finish_reason is not None and req.active:
            with self._cond:
                self.scheduler.release_slot(req, seq.slot)

    def _choose_isolated(
        self, rows: list[tuple[Request, Sequence]], logits: torch.Tensor
    ) -> list[int | Exception]:
        """Each row's token, or the exception that row's request met. A failure of the batched choice
        restores the rows' generators and chooses again request by request, so the others draw exactly
        what they would have drawn without the failing one."""
        generators = [s.generator for _, s in rows]
        states = [None if g is None else g.get_state() for g in generators]
        try:
            return list(self._pick_tokens(rows, logits))
        except Exception as exc:
            log.warning("token choice for %d rows failed (%r); choosing per request", len(rows), exc)
        for g, state in zip(generators, states):
            if g is not None:
                g.set_state(state)
        picked: list[int | Exception] = [0] * len(rows)
        by_request: dict[int, list[int]] = {}
        for i, (req, _) in enumerate(rows):
            by_request.setdefault(req.id, []).append(i)
        for idx in by_request.values():
            try:
                tokens: list[int | Exception] = list(self._pick_tokens([rows[i] for i in idx], logits[idx]))
            except Exception as exc:
                tokens = [exc] * len(idx)
            for i, token in zip(idx, tokens):
                picked[i] = token
        return picked

    def _pick_tokens(self, rows: list[tuple[Request, Sequence]], logits: torch.Tensor) -> list[int]:
        raw = logits.float()
        x = self._apply_processors(rows, raw)  # processors return new tensors: raw stays as it was
        params = [r.params for r, _ in rows]
        _check_finite(x, [p.temperature if p.do_sample else 1.0 for p in params])
        picked: list[int] = [0] * len(rows)
        plain = [i for i, p in enumerate(params) if not p.do_sample]
        if plain:
            for i, token in zip(plain, x[plain].argmax(dim=-1).tolist()):
                picked[i] = token
        slow = []
        for i, p in enumerate(params):
            if p.do_sample:
                token = sampling.draw_top_k(x[i], p.temperature, p.top_k, p.top_p, rows[i][1].generator)
                if token is None:
                    slow.append(i)
                else:
                    picked[i] = token
        if slow:
            dev = x.device
            warped = sampling.warp(
                x[slow],
                torch.tensor([params[i].temperature for i in slow], dtype=torch.float64, device=dev),
                torch.tensor([params[i].top_k for i in slow], device=dev),
                torch.tensor([params[i].top_p for i in slow], dtype=torch.float64, device=dev),
            )
            for i, token in zip(slow, sampling.sample(warped, [rows[i][1].generator for i in slow]).tolist()):
                picked[i] = token
        if any(p.logprobs is not None for p in params):
            self._record_logprobs(rows, raw, picked)
        return picked

    def _apply_processors(
        self, rows: list[tuple[Request, Sequence]], x: torch.Tensor, owned: bool = False
    ) -> torch.Tensor:
        """HF logits processors in HF's order: repetition penalty, then the n-gram ban; then OpenAI's
        presence/frequency penalties. With `owned` (x is the caller's to change) the ban writes into x."""
        params = [r.params for r, _ in rows]
        histories = [s.history for _, s in rows]
        if any(p.repetition_penalty != 1.0 for p in params):
            x = sampling.apply_repetition_penalty(x, histories, [p.repetition_penalty for p in params])
        if any(p.no_repeat_ngram_size for p in params):
            x = sampling.ban_repeated_ngrams(x, histories, [p.no_repeat_ngram_size for p in params], owned)
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            x = sampling.apply_presence_frequency(
                x,
                [s.generated for _, s in rows],
                [p.presence_penalty for p in params],
                [p.frequency_penalty for p in params],
            )
        return x

    def _record_logprobs(self, rows, raw: torch.Tensor, picked: list[int]) -> None:
        lp = F.log_softmax(raw, dim=-1)
        for i, (req, seq) in enumerate(rows):
            k = req.params.logprobs
            if k is None:
                continue
            top = torch.topk(lp[i], k) if k else None
            alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            seq.logprobs = seq.logprobs if seq.logprobs is not None else []
            seq.logprobs.append(TokenLogprob(picked[i], float(lp[i, picked[i]]), alts))

    def _beam_step(self, req: Request, logits: torch.Tensor) -> None:
        rows = [(req, s) for s in req.sequences]
        scores = self._apply_processors(rows, F.log_softmax(logits.float(), dim=-1), owned=True)
        sources, tokens = req.beam.step(scores)
        old = req.sequences
        new_slots: list[int | None] = [None] * len(old)
        claimed: set[int] = set()
        for i, b in enumerate(sources):  # a beam that survives keeps its slot ...
            if b not in claimed:
                claimed.add(b)
                new_slots[i] = old[b].slot
        spare = [b for b in range(len(old)) if b not in claimed]
        src, dst, starts = [], [], []
        for i, b in enumerate(sources):  # ... and a beam that forks is copied into a spare slot,
            if new_slots[i] is None:  # from where its history and the slot's previous one part
                gone = spare.pop()
                new_slots[i] = old[gone].slot
                src.append(old[b].slot)
                dst.append(old[gone].slot)
                starts.append(_common_prefix(old[b].history, old[gone].history))
        self.cache.copy_slots(src, dst, len(old[0].history), starts)
        req.sequences = [
            Sequence(i, new_slots[i], old[b].history + [t], None)
            for i, (b, t) in enumerate(zip(sources, tokens))
        ]
        for s in req.sequences:
            s.generated = s.history[len(req.prompt_ids) :]
        if req.beam.done or len(req.sequences[0].generated) >= req.budget:
            self._finish_beams(req)

    def _finish_beams(self, req: Request) -> None:
        eos = self.tokenizer.eos_token_id
        outputs = []
        for i, (ids, _score) in enumerate(req.beam.finalize()):
            stopped = bool(ids) and ids[-1] == eos
            ids = ids[:-1] if stopped else list(ids)
            text = self.tokenizer.decode(ids)
            cuts = [at for s in req.params.stop if (at := text.find(s)) >= 0]
            if cuts:
                text, stopped = text[: min(cuts)], True
            outputs.append(CompletionOutput(i, text, ids, "stop" if stopped else "length"))
        req.finished_outputs = outputs
        for s in req.sequences:
            s.finish_reason = "stop"
        if req.stream:
            for out in outputs:
                req.sink(StreamDelta(out.index, out.text, out.finish_reason))


def _logits_read(reqs: list[Request]) -> int | None:
    """How many of each row's largest logits the token choice of `reqs` reads: 1 for greedy, top_k + 1
    for top-k sampling (the one past the cut shows ties), where no request uses a logits processor,
    beams or logprobs; else None (every logit)."""
    k = 1
    for p in (r.params for r in reqs):
        if p.is_beam or p.logprobs is not None or p.repetition_penalty != 1.0 or p.no_repeat_ngram_size:
            return None
        if p.presence_penalty or p.frequency_penalty:
            return None
        if p.do_sample:
            if not 0 < p.top_k <= sampling.FAST_MAX_TOP_K:
                return None
            k = max(k, p.top_k + 1)
    return k


def _check_finite(x: torch.Tensor, temperatures: list[float]) -> None:
    """Raise NonFiniteLogitsError when a row's largest logit over its temperature is NaN or infinite
    (nothing could be drawn from it). The caller then chooses per request, so only that one fails."""
    top = x.amax(dim=-1) / torch.tensor(temperatures, dtype=x.dtype, device=x.device)  # (B,)
    if not bool(torch.isfinite(top).all()):
        raise NonFiniteLogitsError(
            "the model's logits for this request are not finite (NaN or inf), so no token can be chosen"
        )


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two histories share: their keys and values there are the same."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)
