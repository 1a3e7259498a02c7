"""The lazy state dict every weight source yields, and the tensors (names, shapes) a GPT-2 needs.

Names are Hugging Face GPT-2's without the `transformer.` prefix (`wte.weight`, `h.0.attn.c_attn.weight`
in Conv1D (in, out) layout, ...). Shapes come from file headers (or the model's shape for random weights)
and each tensor is read, or generated, and converted only when it is first accessed. The engine pops the
tensors one by one as it packs them, so loading holds the packed weights plus the few source tensors
being read (`PREFETCH` ahead) and packed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from gpt2serve.engine.config import ModelConfig

PREFETCH = 3  # tensors read ahead while the model packs the previous ones


class LazyStateDict(MutableMapping[str, torch.Tensor]):
    """A state dict whose tensors are produced only when first accessed; their shapes are known up front.

    Each entry is a shape and a function that returns the tensor. An accessed tensor is kept until it is
    removed, as in a dict; `pop` hands it over without keeping it. `shape()` and `numel()` read nothing.
    With `prefetch`, a background thread reads that many of the first unread entries ahead of time (a
    consumer that takes the tensors about in order then waits less), holding them until they are accessed.
    """

    def __init__(self, prefetch: int = 0) -> None:
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._read: dict[str, Callable[[], torch.Tensor]] = {}  # not started
        self._pending: dict[str, Future[torch.Tensor]] = {}  # being read ahead
        self._held: dict[str, torch.Tensor] = {}
        self._prefetch = prefetch
        self._pool: ThreadPoolExecutor | None = None

    def add(self, name: str, shape: tuple[int, ...], read: Callable[[], torch.Tensor]) -> None:
        self._forget(name)
        self._shapes[name], self._read[name] = tuple(shape), read

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def numel(self) -> int:
        return sum(math.prod(shape) for shape in self._shapes.values())

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self._held.get(name)
        if tensor is None:
            future = self._pending.pop(name, None)
            tensor = future.result() if future is not None else self._read.pop(name)()
            self._held[name] = tensor
            self._read_ahead()
        return tensor

    def __setitem__(self, name: str, tensor: torch.Tensor) -> None:
        self._forget(name)
        self._shapes[name], self._held[name] = tuple(tensor.shape), tensor

    def __delitem__(self, name: str) -> None:
        del self._shapes[name]
        self._forget(name)

    def __contains__(self, name: object) -> bool:
        return name in self._shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __repr__(self) -> str:
        return f"LazyStateDict({len(self)} tensors, {len(self._held)} read)"

    def _forget(self, name: str) -> None:
        self._read.pop(name, None)
        self._held.pop(name, None)
        future = self._pending.pop(name, None)
        if future is not None:
            future.cancel()

    def _read_ahead(self) -> None:
        if not self._prefetch:
            return
        for name in list(self._read)[: self._prefetch - len(self._pending)]:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpt2serve-read")
            self._pending[name] = self._pool.submit(self._read.pop(name))
        if self._pool is not None and not self._read and not self._pending:
            self._pool.shutdown(wait=False)  # everything read: the thread exits
            self._pool = None


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a GPT-2 of this shape needs, in a fixed order, with its shape."""
    e, inner = config.n_embd, 4 * config.n_embd
    shapes: dict[str, tuple[int, ...]] = {
        "wte.weight": (config.vocab_size, e),
        "wpe.weight": (config.n_positions, e),
    }
    for i in range(config.n_layer):
        p = f"h.{i}."
        layer = {
            "ln_1.weight": (e,), "ln_1.bias": (e,),
            "attn.c_attn.weight": (e, 3 * e), "attn.c_attn.bias": (3 * e,),
            "attn.c_proj.weight": (e, e), "attn.c_proj.bias": (e,),
            "ln_2.weight": (e,), "ln_2.bias": (e,),
            "mlp.c_fc.weight": (e, inner), "mlp.c_fc.bias": (inner,),
            "mlp.c_proj.weight": (inner, e), "mlp.c_proj.bias": (e,),
        }  # fmt: skip
        shapes.update({p + k: v for k, v in layer.items()})
    shapes["ln_f.weight"] = (e,)
    shapes["ln_f.bias"] = (e,)
    return shapes
