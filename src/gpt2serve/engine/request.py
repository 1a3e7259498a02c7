"""A request inside the engine: its sequences, their text, and the results handed back to callers."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gpt2serve.engine.beam import BeamGroup
from gpt2serve.engine.params import SamplingParams
from gpt2serve.engine.tokenizer import IncrementalDecoder, Tokenizer

_ids = itertools.count(1)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely alternatives at this position


@dataclass
class CompletionOutput:
    index: int
    text: str  # the continuation only, cut before a stop string
    token_ids: list[int]
    finish_reason: str  # "stop" (end-of-text or a stop string) | "length"
    logprobs: list[TokenLogprob] | None = None


@dataclass
class GenerationResult:
    prompt: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]

    @property
    def completion_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)


@dataclass
class StreamDelta:
    index: int
    text: str
    finish_reason: str | None = None


@dataclass
class Sequence:
    """One sampled sequence or beam, living in one KV slot."""

    index: int
    slot: int
    history: list[int]  # prompt + generated ids: what HF's input_ids row holds
    decoder: IncrementalDecoder | None  # None for beams: their text is decoded once, at the end
    generator: torch.Generator | None = None
    generated: list[int] = field(default_factory=list)
    text: str = ""
    streamed: int = 0  # characters of `text` already sent as deltas
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


class Request:
    """One caller's request. The engine thread mutates it; callers only read results via `sink`."""

    def __init__(
        self,
        prompt: str,
        prompt_ids: list[int],
        params: SamplingParams,
        budget: int,
        sink: Callable[[object], None],
        stream: bool,
        deadline: float | None,
        device: torch.device | str = "cpu",
    ):
        self.id = next(_ids)
        self.prompt, self.prompt_ids, self.params, self.budget = prompt, prompt_ids, params, budget
        self.sink, self.stream = sink, stream
        self.deadline = deadline  # time.monotonic() by which it must end
        self.cancelled = threading.Event()
        self.sequences: list[Sequence] = []
        self.beam: BeamGroup | None = None
        self.finished_outputs: list[CompletionOutput] | None = None
        self.slots: list[int] = []
        # Greedy decoding is deterministic: n identical answers need one sequence, whose text and deltas
        # stand for all n (the one place that knows it: `outputs`, `_emit_delta`).
        self.copies = params.n if params.is_greedy else 1
        self.n_slots = params.num_beams if params.is_beam else params.n // self.copies
        self.token_cost = self.n_slots * (len(prompt_ids) + budget)
        self.generators = _generators(params, self.n_slots, device) if params.do_sample else None

    def cancel(self) -> None:
        self.cancelled.set()

    def start(self, tokenizer: Tokenizer) -> None:
        """Create one sequence per slot once the scheduler has given the request its slots (once: a step
        run again after a failure starts it again)."""
        if self.sequences:
            return
        for i, slot in enumerate(self.slots):
            gen = None if self.generators is None else self.generators[i]
            decoder = None if self.params.is_beam else IncrementalDecoder(tokenizer, self.prompt_ids)
            self.sequences.append(Sequence(i, slot, list(self.prompt_ids), decoder, gen))
        if self.params.is_beam:
            p = self.params
            self.beam = BeamGroup(
                p.num_beams,
                p.n,
                self.budget,
                tokenizer.eos_token_id,
                len(self.prompt_ids),
                early_stopping=p.early_stopping,
            )

    @property
    def active(self) -> list[Sequence]:
        return [s for s in self.sequences if s.finish_reason is None]

    def append_token(self, seq: Sequence, token: int, eos: int) -> None:
        """Add a token to a sampled/greedy sequence and decide whether it is finished."""
        seq.history.append(token)
        if token == eos and self.params.stop_at_eos:
            seq.finish_reason = "stop"
            self._add_text(seq, seq.decoder.flush())
        else:
            seq.generated.append(token)
            self._add_text(seq, seq.decoder.push(token))
            if seq.finish_reason is None and len(seq.generated) >= self.budget:
                seq.finish_reason = "length"
                self._add_text(seq, seq.decoder.flush())
        if self.stream:
            self._emit_delta(seq)

    def _add_text(self, seq: Sequence, piece: str) -> None:
        """Append decoded text; a stop string ends the sequence and is cut off with what follows."""
        if not piece:
            return
        before = len(seq.text)
        seq.text += piece
        hits = [at for s in self.params.stop if (at := seq.text.find(s, max(0, before - len(s) + 1))) >= 0]
        if hits:
            seq.text = seq.text[: min(hits)]
            seq.finish_reason = "stop"

    def _emit_delta(self, seq: Sequence) -> None:
        # Hold back a tail that could be the start of a stop string.
        hold = 0 if seq.finish_reason else max((len(s) - 1 for s in self.params.stop), default=0)
        end = max(seq.streamed, len(seq.text) - hold)
        piece = seq.text[seq.streamed : end]
        if piece or seq.finish_reason:
            seq.streamed = end
            for index in range(seq.index, seq.index + self.copies):
                self.sink(StreamDelta(index, piece, seq.finish_reason))

    def outputs(self) -> list[CompletionOutput]:
        if self.finished_outputs is not None:
            return self.finished_outputs
        outs = [
            CompletionOutput(s.index, s.text, s.generated, s.finish_reason or "length", s.logprobs)
            for s in self.sequences
        ]
        if self.copies > 1:
            first = outs[0]
            outs = [
                CompletionOutput(i, first.text, list(first.token_ids), first.finish_reason, first.logprobs)
                for i in range(self.copies)
            ]
        return outs

    def result(self) -> GenerationResult:
        return GenerationResult(self.prompt, self.prompt_ids, self.outputs())


Row = tuple[Request, Sequence]  # one row of an engine step: a sequence and the request it belongs to


def _generators(params: SamplingParams, n: int, device: torch.device | str) -> list[torch.Generator]:
    """One generator per sampled sequence: sequence 0 seeded with `seed`, sequence i with a mix of it and
    i (no seed: each from the OS's entropy)."""
    generators = [torch.Generator(device=device) for _ in range(n)]
    for i, gen in enumerate(generators):
        if params.seed is None:
            gen.seed()
        else:
            gen.manual_seed(params.seed if i == 0 else (params.seed ^ (i * 0x9E3779B97F4A7C15)) % 2**63)
    return generators
