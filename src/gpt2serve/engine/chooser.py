"""The token chooser: one object built per step from its rows' parameters (as vLLM's sampler and TGI's
NextTokenChooser are) that turns the step's logits into each row's next token.

HF's logits processors first (repetition penalty, n-gram ban; then OpenAI's presence/frequency
penalties), then greedy rows take the argmax and sampling rows go through `sampling.choose`, the one
entry point to the reference sampler and its fast paths. Rows asking for logprobs get them recorded.

`choose_isolated` is the step's safety net: a failure of the batched choice restores every row's
generator and chooses again request by request, so only the request that caused it fails. `advance` is
a step's token side as the engine calls it: each plain row's token chosen and appended, each beam
request stepped (beams.py), and the requests that failed named.
"""

from __future__ import annotations

import logging
import math
from array import array
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gpt2serve.engine import native, processors, sampling
from gpt2serve.engine.beams import beam_groups, step_beams
from gpt2serve.engine.device.host import to_device
from gpt2serve.engine.errors import NonFiniteLogitsError
from gpt2serve.engine.kv_cache import KVCache
from gpt2serve.engine.params import SamplingParams
from gpt2serve.engine.request import Request, Row, Sequence, TokenLogprob
from gpt2serve.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def logits_read(params: list[SamplingParams]) -> int | None:
    """How many of each row's largest logits choosing for `params` reads: 1 for greedy, top_k + 1 for
    top-k sampling (the one past the cut shows ties), where no row uses a logits processor, beams or
    logprobs; else None (every logit)."""
    k = 1
    for p in params:
        if p.is_beam or p.logprobs is not None or p.repetition_penalty != 1.0 or p.no_repeat_ngram_size:
            return None
        if p.presence_penalty or p.frequency_penalty:
            return None
        if p.do_sample:
            if not 0 < p.top_k <= sampling.FAST_MAX_TOP_K:
                return None
            k = max(k, p.top_k + 1)
    return k


class TokenChooser:
    """The next token of each of a step's (request, sequence) rows, beams excepted."""

    def __init__(self, rows: list[Row]):
        self.rows = rows
        self.params = [r.params for r, _ in rows]

    def process(self, x: torch.Tensor, owned: bool = False) -> torch.Tensor:
        """HF logits processors in HF's order: repetition penalty, then the n-gram ban; then OpenAI's
        presence/frequency penalties. With `owned` (x is the caller's to change) the ban writes into x;
        otherwise x is left as it was."""
        params, histories = self.params, [s.history for _, s in self.rows]
        if any(p.repetition_penalty != 1.0 for p in params):
            x = processors.apply_repetition_penalty(x, histories, [p.repetition_penalty for p in params])
        if any(p.no_repeat_ngram_size for p in params):
            x = processors.ban_repeated_ngrams(x, histories, [p.no_repeat_ngram_size for p in params], owned)
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            x = processors.apply_presence_frequency(
                x,
                [s.generated for _, s in self.rows],
                [p.presence_penalty for p in params],
                [p.frequency_penalty for p in params],
            )
        return x

    def choose(self, logits: torch.Tensor) -> list[int]:
        """Each row's token (raises NonFiniteLogitsError where a row has nothing to draw from)."""
        raw = logits.float()
        x = self.process(raw)  # processors return new tensors: raw stays as it was
        params = self.params
        peaks = native.row_max(x)  # every row's amax and argmax in one pass, where the kernels run
        largest, first = peaks if peaks is not None else (x.amax(dim=-1), None)
        check_finite(largest, [p.temperature if p.do_sample else 1.0 for p in params])
        picked = [0] * len(params)
        plain = [i for i, p in enumerate(params) if not p.do_sample]
        if plain:
            tokens = first[plain] if first is not None else x[plain].argmax(dim=-1)
            for i, token in zip(plain, tokens.tolist()):
                picked[i] = token
        drawn = [i for i, p in enumerate(params) if p.do_sample]
        if drawn:
            settings = [params[i] for i in drawn]
            generators = [self.rows[i][1].generator for i in drawn]
            rows = x if len(drawn) == len(params) else x[drawn]  # no copy where every row samples
            for i, token in zip(drawn, sampling.choose(rows, settings, generators)):
                picked[i] = token
        if any(p.logprobs is not None for p in params):
            self._record_logprobs(raw, picked)
        return picked

    def _record_logprobs(self, raw: torch.Tensor, picked: list[int]) -> None:
        lp = F.log_softmax(raw, dim=-1)
        for i, (req, seq) in enumerate(self.rows):
            k = req.params.logprobs
            if k is None:
                continue
            top = torch.topk(lp[i], k) if k else None
            alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            seq.logprobs = seq.logprobs if seq.logprobs is not None else []
            seq.logprobs.append(TokenLogprob(picked[i], float(lp[i, picked[i]]), alts))


def advance(
    rows: list[Row],
    logits: torch.Tensor,
    cache: KVCache,
    tokenizer: Tokenizer,
    release: Callable[[Request, Sequence], None],
    chooser: type[TokenChooser] = TokenChooser,
) -> dict[int, Exception]:
    """Each row's next token chosen and appended (a beam request: its step), by request id the error of
    each request whose choice or update failed (it fails alone). `release(req, seq)`: seq finished while
    its request runs on, so its slot may go. `chooser`: the plain rows' (device/chooser.py's on the
    device path); beams step on the host."""
    failed: dict[int, Exception] = {}
    plain = [i for i, (r, _) in enumerate(rows) if r.beam is None]
    mine = logits if len(plain) == len(rows) else logits[plain]  # no copy without beams
    chosen = choose_isolated([rows[i] for i in plain], mine, chooser) if plain else []
    for i, token in zip(plain, chosen):
        req, seq = rows[i]
        if isinstance(token, Exception) or req.id in failed:
            failed.setdefault(req.id, token)
            continue
        try:
            req.append_token(seq, token, tokenizer.eos_token_id)
            if seq.finish_reason is not None and req.active:
                release(req, seq)
        except Exception as exc:
            failed[req.id] = exc
    for req, idx in beam_groups(rows):
        try:
            beams = TokenChooser([(req, s) for s in req.sequences])
            scores = beams.process(F.log_softmax(logits[idx].float(), dim=-1), owned=True)
            step_beams(req, scores, cache, tokenizer)
        except Exception as exc:
            failed[req.id] = exc
    return failed


def choose_isolated(
    rows: list[Row], logits: torch.Tensor, chooser: type[TokenChooser] = TokenChooser
) -> list[int | Exception]:
    """Each row's token, or the exception that row's request met. A failure of the batched choice
    restores the rows' generators and chooses again request by request, so the others draw exactly
    what they would have drawn without the failing one."""
    generators = [s.generator for _, s in rows]
    states = [None if g is None else g.get_state() for g in generators]
    try:
        return list(chooser(rows).choose(logits))
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
            tokens: list[int | Exception] = list(chooser([rows[i] for i in idx]).choose(logits[idx]))
        except Exception as exc:
            tokens = [exc] * len(idx)
        for i, token in zip(idx, tokens):
            picked[i] = token
    return picked


NON_FINITE = "the model's logits for this request are not finite (NaN or inf), so no token can be chosen"


def finite_rows(largest: torch.Tensor, temperatures: list[float]) -> torch.Tensor:
    """(B,) bool: whether a row's largest logit (`largest`, (B,): the rows' amax) over its temperature is
    finite (something can be drawn)."""
    t = to_device(torch.tensor(temperatures, dtype=largest.dtype), largest.device)
    return torch.isfinite(largest / t)


def check_finite(largest: torch.Tensor, temperatures: list[float]) -> None:
    """Raise NonFiniteLogitsError when a row's largest logit over its temperature is NaN or infinite
    (nothing could be drawn from it). The caller then chooses per request, so only that one fails.
    `finite_rows` in float32 on the host, without its four small torch calls: the quotient in double
    rounds to the float32 quotient."""
    t32 = array("f", temperatures)
    if not all(math.isfinite(array("f", [v / t])[0]) for v, t in zip(largest.tolist(), t32, strict=True)):
        raise NonFiniteLogitsError(NON_FINITE)
