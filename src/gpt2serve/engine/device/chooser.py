"""The token chooser of the device path: chooser.TokenChooser's choice as batched tensor ops.

The logits processors run as device/processors.py's batched ops (the rows' histories copied to the
device once, only when a row uses one), then sampling.choose_batch picks every row's token. The step's
one copy to the host is a (2, B) tensor: each row's token and whether its logits could be drawn from
(chooser.check_finite's test); the request's end (end of text, length, stop strings) is then decided on
the host by Request.append_token, as on the CPU path. Logprobs, where asked, are read as there.
"""

from __future__ import annotations

import torch

from gpt2serve.engine import sampling
from gpt2serve.engine.chooser import NON_FINITE, TokenChooser, finite_rows
from gpt2serve.engine.device import processors
from gpt2serve.engine.device.host import to_device
from gpt2serve.engine.errors import NonFiniteLogitsError


class DeviceTokenChooser(TokenChooser):
    """TokenChooser with the device path's processors and sampler (same rows, same results for greedy
    rows; sampled rows as device/sampling.py guarantees)."""

    def process(self, x: torch.Tensor, owned: bool = False) -> torch.Tensor:
        """processors.py's processors in its order, batched; x is never written (`owned` is unused)."""
        params = self.params
        penalized = any(p.repetition_penalty != 1.0 for p in params)
        sizes = {p.no_repeat_ngram_size for p in params} - {0}
        openai = any(p.presence_penalty or p.frequency_penalty for p in params)
        if not (penalized or sizes or openai):
            return x
        history = processors.History.of([s.history for _, s in self.rows], x.shape[-1], x.device)

        def column(values: list[float]) -> torch.Tensor:
            return to_device(torch.tensor(values, dtype=x.dtype), x.device)

        if penalized:
            x = processors.repetition_penalty(x, history, column([p.repetition_penalty for p in params]))
        if sizes:
            ngram = to_device(torch.tensor([p.no_repeat_ngram_size for p in params]), x.device)
            x = processors.ban_ngrams(x, history, ngram, sizes)
        if openai:
            starts = [len(s.history) - len(s.generated) for _, s in self.rows]
            x = processors.presence_frequency(
                x,
                history,
                to_device(torch.tensor(starts), x.device),
                column([p.presence_penalty for p in params]),
                column([p.frequency_penalty for p in params]),
            )
        return x

    def choose(self, logits: torch.Tensor) -> list[int]:
        """Each row's token (raises NonFiniteLogitsError where a row has nothing to draw from)."""
        raw = logits.float()
        x = self.process(raw)
        params = self.params
        # seeded rows draw from their own generator; the others share the device's default one
        generators = [s.generator if p.seed is not None else None for p, (_, s) in zip(params, self.rows)]
        tokens = sampling.choose_batch(x, params, generators)
        temperatures = [p.temperature if p.do_sample else 1.0 for p in params]
        finite = finite_rows(x.amax(dim=-1), temperatures).long()
        picked, finite = torch.stack([tokens, finite]).tolist()  # the step's one copy to the host
        if not all(finite):
            raise NonFiniteLogitsError(NON_FINITE)
        if any(p.logprobs is not None for p in params):
            self._record_logprobs(raw, picked)
        return picked
