"""An int8 sketch of the output head: which tokens can be among a row's k largest logits, for a quarter of
the bytes a float32 head streams.

Greedy decoding and top-k sampling read only each row's k largest logits (plus one, to see ties at the
cut). The sketch holds the head's (V, C) matrix in int8 with per-row scales and, per token t, a slack
such that the sketch's logit is within ||x||_2 * slack[t] of the exact one as the head computes it:
slack[t] = ||W[t] - sketch row||_2 (Cauchy-Schwarz) plus the rounding either float32 sum can make
((C + 8) * 2^-24 * (||W[t]||_2 + ||sketch row||_2)), widened by 0.1 %. A token whose upper bound is below
the k-th largest lower bound cannot be among the top k; the others (the candidates: with GPT-2's random
init a few hundred of 50257) get their exact logits from the head's own rows, through the same kernel, so
bit for bit those of the full product. Every other logit is -inf. Where the candidates would be more than
MAX_CANDIDATE_SHARE of the vocabulary, the full head runs instead.
"""

from __future__ import annotations

import torch

from gpt2serve.engine import native
from gpt2serve.engine.linear import PackedLinear, in_huge_pages, quantize_int8

MAX_CANDIDATE_SHARE = 0.125
# Rows past these take the full head: the sketch costs as many FMAs per row as the head (it saves bytes,
# not arithmetic) and the candidates' union grows with the rows. Where the two cross on a Zen 5 (random
# gpt2, 2 threads, ms): top 1 at 32 rows 6.1 against 7.2; top 50 at 16 rows 3.9 against 3.9, at 20 5.0
# against 4.6, at 32 8.3 against 7.2.
SKETCH_MAX_ROWS = {1: 32}  # by the `top` asked for
SKETCH_MAX_ROWS_TOP_K = 16  # any other `top`
ROUNDING = 2.0**-24  # float32's unit roundoff
WIDEN = 1.001
SLACK_CHUNK = 1024  # rows per float64 temporary (gpt2-xl: 13 MB)


class HeadSketch:
    def __init__(self, head: PackedLinear):
        self.head = head
        w = head.weight  # (V, C) float32 or bfloat16, gemv.c's layout
        q, self.scale = quantize_int8(w)
        self.q = in_huge_pages(q, torch.int8)
        del q
        self.slack = torch.empty(w.shape[0], dtype=torch.float32)
        rounding = (w.shape[1] + 8) * ROUNDING
        for start in range(0, w.shape[0], SLACK_CHUNK):  # small float64 temporaries
            rows = slice(start, start + SLACK_CHUNK)
            exact, sketch = w[rows].double(), self.q[rows].double() * self.scale[rows, None].double()
            norms = exact.norm(dim=1) + sketch.norm(dim=1)
            slack = ((exact - sketch).norm(dim=1) + rounding * norms) * WIDEN
            self.slack[rows] = slack.float().nextafter(torch.tensor(float("inf")))  # rounded up

    @staticmethod
    def pays(rows: int, top: int) -> bool:
        """Whether `logits(x, top)` for `rows` rows is faster than the full head (see SKETCH_MAX_ROWS)."""
        return rows <= SKETCH_MAX_ROWS.get(top, SKETCH_MAX_ROWS_TOP_K)

    @property
    def nbytes(self) -> int:
        return self.q.numel() + 8 * self.slack.numel()

    def logits(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """(N, V) float32: the exact logits of every token that can be among its row's k largest (the
        union over rows), -inf elsewhere. `x` is the (N, C) float32 input of the head."""
        vocab = self.q.shape[0]
        sketch = native.gemv(x, self.q, self.scale, None)  # (N, V)
        candidates = native.candidates(sketch, self.slack, x.norm(dim=1) * WIDEN, k)
        if candidates is None or len(candidates) > MAX_CANDIDATE_SHARE * vocab:
            return self.head(x)
        out = torch.full_like(sketch, float("-inf"))
        out[:, candidates] = native.gemv(x, self.head.weight.index_select(0, candidates), None, None)
        return out
