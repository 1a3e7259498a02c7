"""A beam-search request's part of an engine step: one `BeamGroup.step` (beam.py) over its processed
log-probabilities (chooser.advance prepares them), the KV slots of beams that fork copied, and its
outputs once it ends."""

from __future__ import annotations

import torch

from gpt2serve.engine.kv_cache import KVCache
from gpt2serve.engine.request import CompletionOutput, Request, Row, Sequence, StreamDelta
from gpt2serve.engine.tokenizer import Tokenizer


def beam_groups(rows: list[Row]) -> list[tuple[Request, list[int]]]:
    """Each beam request among `rows` with the indices of its rows, in beam order."""
    groups: dict[int, tuple[Request, list[int]]] = {}
    for i, (r, _) in enumerate(rows):
        if r.beam is not None:
            groups.setdefault(r.id, (r, []))[1].append(i)
    for _, idx in groups.values():
        idx.sort(key=lambda i: rows[i][1].index)
    return list(groups.values())


def step_beams(req: Request, scores: torch.Tensor, cache: KVCache, tokenizer: Tokenizer) -> None:
    """Advance every beam of `req` by one token (scores: (beams, V) log-probabilities after the logits
    processors, in beam order)."""
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
    cache.copy_slots(src, dst, len(old[0].history), starts)
    req.sequences = [
        Sequence(i, new_slots[i], old[b].history + [t], None) for i, (b, t) in enumerate(zip(sources, tokens))
    ]
    for s in req.sequences:
        s.generated = s.history[len(req.prompt_ids) :]
    if req.beam.done or len(req.sequences[0].generated) >= req.budget:
        _finish_beams(req, tokenizer)


def _finish_beams(req: Request, tokenizer: Tokenizer) -> None:
    eos = tokenizer.eos_token_id
    outputs = []
    for i, (ids, _score) in enumerate(req.beam.finalize()):
        stopped = bool(ids) and ids[-1] == eos
        ids = ids[:-1] if stopped else list(ids)
        text = tokenizer.decode(ids)
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


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two histories share: their keys and values there are the same."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)
