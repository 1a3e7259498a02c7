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

Where the CPU has AVX-512 VNNI, steps of INTEGER_ROWS (greedy) or INTEGER_ROWS_TOP_K (top-k) rows run
the sketch in integers (sketch.c): each row x is quantized to 8 bits too (x^ = x_scale * q, q in
-127..127), which widens each token's bound by ||x - x^||_2 * ||sketch row||_2 (Cauchy-Schwarz again)
plus the final multiply's rounding (2^-21 ||x^||_2 ||sketch row||_2 covers it), widened like the rest.
With many rows the float32 sketch costs as many FMAs as the head; the integer one a fraction. Top-k rows
then keep each row's own candidates (native.candidates by_row) and get their exact logits from each head
row read once for all the rows that need it (native.rescore, gemv's sums): the union over 48 rows would
be half the vocabulary, each row's own are ~1.3 % of it.
"""

from __future__ import annotations

import torch

from gpt2serve.engine import native
from gpt2serve.engine.linear import PackedLinear, in_huge_pages, quantize_int8

MAX_CANDIDATE_SHARE = 0.125
# Without the integer sketch, rows past these take the full head: the float32 sketch costs as many FMAs
# per row as the head (it saves bytes, not arithmetic) and the candidates' union grows with the rows.
# Where the two cross on a Zen 5 (random gpt2, 2 threads, ms): top 1 at 32 rows 6.1 against 7.2; top 50
# at 16 rows 3.9 against 3.9, at 20 5.0 against 4.6, at 32 8.3 against 7.2.
SKETCH_MAX_ROWS = {1: 32}  # by the `top` asked for
SKETCH_MAX_ROWS_TOP_K = 16  # any other `top`
# The integer sketch (VNNI). Its wider bound (8-bit activations) gives 3-5x the candidates: few for top
# 1, whose union serves; for top 51 ~675 a row, so each row keeps its own. Zen 5, ms (integer, float32
# sketch, full head): top 1 at 1 row 1.04 / 0.94 / 3.3 (quantizing x costs more than it saves), 4 rows
# 0.97 / 1.04, 12 rows 1.3 / 2.6 / 3.6, 32 rows 2.7 / 6.4 / 6.2; top 51 at 4 rows 1.16 / 1.12, 6 rows 1.38 /
# 1.57, 16 rows 2.2 / 4.4 / 3.9, 32 rows 3.9 / 8.3 / 6.2, 48 rows 5.6 / 18.3 / 8.8.
INTEGER_ROWS = range(4, 65)
INTEGER_ROWS_TOP_K = range(6, 65)  # top > 1, a float32 head (native.rescore reads float32)
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
        self.row_norms = torch.empty(w.shape[0], dtype=torch.float32)  # ||sketch row||_2, rounded up
        self.row_sums = self.q.sum(dim=1, dtype=torch.int32)
        self.integer = native.sketch_int8_available() and w.shape[1] % 4 == 0
        # sketch.c's layout of q (as much again: the float32 sketch's gemv reads q row by row)
        self.packed = in_huge_pages(native.pack_sketch(self.q), torch.int8) if self.integer else None
        rounding = (w.shape[1] + 8) * ROUNDING
        for start in range(0, w.shape[0], SLACK_CHUNK):  # small float64 temporaries
            rows = slice(start, start + SLACK_CHUNK)
            exact, sketch = w[rows].double(), self.q[rows].double() * self.scale[rows, None].double()
            norms = exact.norm(dim=1) + sketch.norm(dim=1)
            slack = ((exact - sketch).norm(dim=1) + rounding * norms) * WIDEN
            self.slack[rows] = _rounded_up(slack)
            self.row_norms[rows] = _rounded_up(sketch.norm(dim=1))

    def pays(self, rows: int, top: int) -> bool:
        """Whether `logits(x, top)` for `rows` rows is faster than the full head (see SKETCH_MAX_ROWS)."""
        return self._integer_for(rows, top) or rows <= SKETCH_MAX_ROWS.get(top, SKETCH_MAX_ROWS_TOP_K)

    def _integer_for(self, rows: int, top: int) -> bool:
        if not self.integer:
            return False
        return rows in INTEGER_ROWS if top == 1 else self._by_row and rows in INTEGER_ROWS_TOP_K

    @property
    def _by_row(self) -> bool:
        """Whether rows may take their own candidates (native.rescore reads a float32 head)."""
        return self.head.weight.dtype == torch.float32

    @property
    def nbytes(self) -> int:
        return self.q.numel() + (0 if self.packed is None else self.packed.numel()) + 16 * self.slack.numel()

    def logits(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """(N, V) float32: the exact logits of every token that can be among its row's k largest (the
        union over rows; each row's own where top-k rows take the integer sketch), -inf elsewhere. `x` is
        the (N, C) float32 input of the head."""
        vocab, r = self.q.shape[0], x.norm(dim=1) * WIDEN
        integer = self._integer_sketch(x) if self._integer_for(x.shape[0], k) else None
        if integer is not None and k > 1:  # each row's own candidates, each head row read once
            marked = native.candidates(integer[0], self.slack, r, k, integer[1], self.row_norms, by_row=True)
            if marked is None or marked[1] > MAX_CANDIDATE_SHARE * vocab * x.shape[0]:
                return self.head(x)
            out = native.rescore(x, self.head.weight, marked[0])
            return self.head(x) if out is None else out
        if integer is not None:
            sketch, e = integer
            candidates = native.candidates(sketch, self.slack, r, k, e, self.row_norms)
        else:
            sketch = native.gemv(x, self.q, self.scale, None)  # (N, V)
            candidates = native.candidates(sketch, self.slack, r, k)
        if candidates is None or len(candidates) > MAX_CANDIDATE_SHARE * vocab:
            return self.head(x)
        out = torch.full_like(sketch, float("-inf"))
        out[:, candidates] = native.gemv(x, self.head.weight.index_select(0, candidates), None, None)
        return out

    def _integer_sketch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The sketch from 8-bit rows (sketch.c) and each row's second bound factor ||x - x^|| + 2^-21
        ||x^||, widened and rounded up; None for a row that is not finite (the float32 sketch then
        finds the NaN)."""
        top = x.abs().amax(dim=1)
        if not bool(torch.isfinite(top).all()):
            return None
        x_scale = (top / 127).clamp(min=1e-30)
        q = torch.round(x / x_scale[:, None]).clamp_(-127, 127)
        dequantized = q.double() * x_scale.double()[:, None]
        e = ((x.double() - dequantized).norm(dim=1) + 2.0**-21 * dequantized.norm(dim=1)) * WIDEN
        shifted = (q + 128).to(torch.uint8)
        sketch = native.sketch_int8(shifted, x_scale, self.packed, self.scale, self.row_sums)
        return None if sketch is None else (sketch, _rounded_up(e))


def _rounded_up(t: torch.Tensor) -> torch.Tensor:
    """float64 `t` as float32, never below it."""
    return t.float().nextafter(torch.tensor(float("inf")))
