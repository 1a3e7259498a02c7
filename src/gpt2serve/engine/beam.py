"""BeamGroup: the beam search of one request, token for token as Hugging Face `generate()`.

Replicates transformers 5.x `_beam_search` (`generate(num_beams=B, num_return_sequences=R,
do_sample=False, length_penalty=..., early_stopping=...)`) for one request, without a batch dimension,
so that the engine can run many groups side by side, each on its own slice of a batched forward pass.

Calling contract of `step(logprobs)`:

* `logprobs` is a float32 tensor of shape `(num_beams, V)`: row `i` belongs to running beam `i`, in the
  order the previous `step` returned them (at the first step every beam holds the prompt; a single
  `(1, V)` row is accepted there and broadcast).
* Each row is computed exactly as HF does for beam search:
  `logprobs = log_softmax(logits.float(), dim=-1)` first, and THEN the logits processors run on those
  log-probabilities (not on the raw logits), in HF's order: repetition penalty (which multiplies the
  negative log-probabilities by the penalty), then the no-repeat-n-gram ban (banned tokens get -inf).
  The processors see each beam's history = prompt + tokens generated so far on that beam.
  No temperature / top-k / top-p: HF applies those only when sampling.
* `step` returns `(source_beams, tokens)`, `num_beams` of each: new beam `j` continues old beam
  `source_beams[j]` with token `tokens[j]`. The caller reorders its KV-cache slots and histories by
  `source_beams`, appends `tokens`, and runs the next forward pass, until `done` is true (the beams
  returned by the step that sets `done` are not to be run; read the results with `finalize()`).

Semantics replicated from HF (batch size 1):

* Running scores start at `[0, -1e9, ...]`, so the first step expands beam 0 only.
* Each step takes the top `2 * num_beams` of `logprobs + running_score` over all `num_beams * V`
  candidates (`torch.topk`, hence its tie-breaking). Candidates ending in EOS, or reaching
  `prompt_len + max_new_tokens` tokens, hit the stopping criteria; the best `num_beams` of the rest run on.
* Among the first `num_beams` candidates, those that hit a stopping criterion become finished
  hypotheses scored `sum_logprob / n_generated ** length_penalty`, where `n_generated` counts the
  generated tokens only (the prompt excluded, the final EOS included). Finished hypotheses and new ones
  are merged by `topk`, keeping the best `num_beams`.
* With `early_stopping=True` the search ends as soon as `num_beams` hypotheses are finished; at the
  length limit every top candidate is finished, so running beams end as hypotheses too.
* `finalize()` returns the best `num_return` hypotheses, best first, with their normalized scores
  (HF's `sequences_scores`). Token ids are the generated ones, ending with EOS where a hypothesis
  stopped on it (as in HF's `sequences`, minus the prompt and the padding).
"""

from __future__ import annotations

from array import array

import torch

from gpt2serve.engine import native

_NEG = -1.0e9  # HF's "never pick this" score offset


def _f32(x: float) -> float:
    """`x` rounded to float32, as a Python float: the scores below are float32 arithmetic, as in HF."""
    return array("f", (x,))[0]


def _topk(values: list[float], k: int) -> list[int]:
    """The indices `torch.topk(values, k)` returns: a Python sort where the values are distinct (a few
    microseconds), torch.topk itself where ties leave the order to its tie-breaking."""
    if len(set(values)) == len(values):
        return sorted(range(len(values)), key=values.__getitem__, reverse=True)[:k]
    return torch.topk(torch.tensor([values], dtype=torch.float32), k=k)[1][0].tolist()


class BeamGroup:
    """The state of one beam-search request. The few scores it keeps are Python floats holding float32
    values, every operation on them rounded as HF's float32 tensors round it: a step's bookkeeping is
    then a few dozen microseconds, not a few dozen small tensor operations."""

    def __init__(
        self,
        num_beams: int,
        num_return: int,
        max_new_tokens: int,
        eos_token_id: int | None,
        prompt_len: int,
        length_penalty: float = 1.0,
        early_stopping: bool | str = True,
    ) -> None:
        if num_beams < 1 or not 1 <= num_return <= num_beams:
            raise ValueError(f"need 1 <= num_return ({num_return}) <= num_beams ({num_beams})")
        if max_new_tokens < 1 or prompt_len < 1:
            raise ValueError("max_new_tokens and prompt_len must be >= 1")
        self.num_beams = num_beams
        self.num_return = num_return
        self.eos_token_id = eos_token_id
        self.prompt_len = prompt_len
        self.max_length = prompt_len + max_new_tokens
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.done = False
        self._keep = 2 * num_beams  # HF: max(2, 1 + n_eos) * num_beams, with at most one EOS id
        self._cur_len = prompt_len
        self._running_scores = [0.0] + [_NEG] * (num_beams - 1)
        self._running_tokens: list[list[int]] = [[] for _ in range(num_beams)]
        self._finished_scores = [_NEG] * num_beams
        self._finished_tokens: list[list[int]] = [[] for _ in range(num_beams)]
        self._finished_flags = [False] * num_beams
        self._improvable = True

    @property
    def num_generated(self) -> int:
        """Tokens generated so far on every running beam."""
        return self._cur_len - self.prompt_len

    def step(self, logprobs: torch.Tensor) -> tuple[list[int], list[int]]:
        """Advance every beam by one token; see the module docstring for what `logprobs` must hold."""
        if self.done:
            raise RuntimeError("step() called on a finished BeamGroup")
        rows = logprobs.shape[0] if logprobs.dim() == 2 else 0
        if rows != self.num_beams and not (rows == 1 and self._cur_len == self.prompt_len):
            raise ValueError(f"logprobs must have shape ({self.num_beams}, V), got {tuple(logprobs.shape)}")
        vocab = logprobs.shape[-1]
        logprobs = logprobs.float().reshape(-1, vocab).expand(self.num_beams, vocab)
        scores = torch.tensor(self._running_scores, dtype=torch.float32, device=logprobs.device)
        top = native.topk(logprobs, self._keep, scores)  # torch.topk's answer where no ties are involved
        if top is None:
            top = torch.topk((logprobs + scores[:, None]).reshape(-1), k=self._keep)
        top_lp, top_idx = top[0].tolist(), top[1].tolist()
        top_src = [i // vocab for i in top_idx]
        top_tok = [i % vocab for i in top_idx]
        hits = self._stopping(top_tok)
        top_seqs = [self._running_tokens[s] + [t] for s, t in zip(top_src, top_tok, strict=True)]
        # e. the best non-finished candidates run on
        run_lp = [_f32(lp + _NEG) if hit else lp for lp, hit in zip(top_lp, hits, strict=True)]
        nxt = _topk(run_lp, self.num_beams)
        self._running_scores = [run_lp[i] for i in nxt]
        self._running_tokens = [top_seqs[i] for i in nxt]
        # f. finished candidates among the top num_beams join the hypotheses
        self._update_finished(top_lp, top_seqs, hits)
        # g. stopping condition of the whole search
        self._cur_len += 1
        self._update_improvable()
        self.done = not self._has_unfinished(hits)
        return [top_src[i] for i in nxt], [seq[-1] for seq in self._running_tokens]

    def finalize(self) -> list[tuple[list[int], float]]:
        """The best `num_return` hypotheses, best first: (generated token ids, normalized score)."""
        return [(list(self._finished_tokens[i]), self._finished_scores[i]) for i in range(self.num_return)]

    # -- HF's helpers, batch size 1 ----------------------------------------------------------------
    def _stopping(self, top_tok: list[int]) -> list[bool]:
        """HF's stopping criteria on each candidate: EOS reached, or the length limit."""
        if self._cur_len + 1 >= self.max_length:
            return [True] * len(top_tok)
        return [t == self.eos_token_id for t in top_tok]

    def _normalized(self, score: float, n_generated: int) -> float:
        """float32 `score / n_generated ** length_penalty` (torch rounds the divisor to float32 first)."""
        return _f32(score / _f32(n_generated**self.length_penalty))

    def _update_finished(self, top_lp: list[float], top_seqs: list[list[int]], hits: list[bool]) -> None:
        just_finished = [hit and i < self.num_beams for i, hit in enumerate(hits)]
        full = all(self._finished_flags) and self.early_stopping is True
        scores = []
        for lp, new in zip(top_lp, just_finished, strict=True):
            s = self._normalized(lp, self._cur_len + 1 - self.prompt_len)
            for penalized in (full, not self._improvable, not new):  # HF adds each as a float32 -1e9
                s = _f32(s + _NEG) if penalized else s
            scores.append(s)
        merged_scores = self._finished_scores + scores
        merged_flags = self._finished_flags + just_finished
        merged_seqs = self._finished_tokens + top_seqs
        sel = _topk(merged_scores, self.num_beams)
        self._finished_scores = [merged_scores[i] for i in sel]
        self._finished_flags = [merged_flags[i] for i in sel]
        self._finished_tokens = [merged_seqs[i] for i in sel]

    def _update_improvable(self) -> None:
        """HF's `_check_early_stop_heuristic` (after `cur_len` moved on)."""
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_len = self.max_length - self.prompt_len
        else:
            best_len = self._cur_len - self.prompt_len
        best_possible = self._normalized(self._running_scores[0], best_len)
        worst = min(self._finished_scores)
        self._improvable = self._improvable and any(
            best_possible > (worst if flag else _NEG) for flag in self._finished_flags
        )

    def _has_unfinished(self, hits: list[bool]) -> bool:
        """HF's `_beam_search_has_unfinished_sequences`."""
        all_full = all(self._finished_flags) and self.early_stopping is True
        return self._improvable and not all_full and not all(hits)
