"""gpt2serve's CPU kernels, built with the system C compiler on first use and loaded with ctypes.

gemv.c: few-row matrix products, which stream a weight matrix at the machine's read bandwidth where
oneDNN's and MKL's small-batch paths reach about two thirds of it (see linear.py); built 16 floats wide
where the CPU has AVX-512, else 8 (`isa`). decode.c: a whole decode step through every layer in one call
(see `decode`). sampling.c: an exact top-k, the head sketch's candidates and torch's CPU generator
advanced without drawing every number (see `topk`, `candidates`, `uniform_at`). nucleus.c: top-p's cut
as Hugging Face makes it, from the row's values sorted without their indices (`sort_values`,
`top_p_apply`). sketch.c: the head sketch's logits in integers, where the CPU has AVX-512 VNNI
(`sketch_int8`). The library is cached under `$GPT2SERVE_CACHE_DIR` (default `~/.cache/gpt2serve`; see
`kernel_cache`), keyed by a hash of the source and the compile command (`$CC`, else `cc`, and the
instruction set's flags). Without a C compiler, or on a CPU without AVX2 and FMA, `available()` is false
and the caller keeps torch's kernels (`--cpu-kernels torch` chooses them).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil
from pathlib import Path

import torch

from gpt2serve.engine import kernel_cache

log = logging.getLogger(__name__)

SOURCES = tuple(
    Path(__file__).with_name("csrc") / name
    for name in ("gemv.c", "decode.c", "sampling.c", "nucleus.c", "sketch.c", "kernels.h")
)
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC")
AVX512_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq")
ISAS = ("avx2", "avx512")
FORMAT_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3}
K_MULTIPLE = 8  # the kernels read 8 weights at a time


def isa() -> str | None:
    """The instruction set the kernels are built for: "avx512" where torch finds AVX-512 (F, BW, VL, DQ),
    "avx2" where it finds AVX2 and FMA, None below; `$GPT2SERVE_KERNEL_ISA=avx2` picks AVX2 on an
    AVX-512 CPU (to compare the two)."""
    capability = torch.backends.cpu.get_cpu_capability()
    best = "avx512" if capability == "AVX512" else "avx2" if capability == "AVX2" else None
    wanted = os.environ.get("GPT2SERVE_KERNEL_ISA", "").lower() or best
    if wanted not in ISAS:
        raise ValueError(f"GPT2SERVE_KERNEL_ISA must be one of {ISAS}, got {wanted!r}")
    return None if best is None else wanted if ISAS.index(wanted) <= ISAS.index(best) else best


def _flags() -> tuple[str, ...]:
    return FLAGS + AVX512_FLAGS if isa() == "avx512" else FLAGS


def compiler() -> str | None:
    """The C compiler the kernels are built with: `$CC`, else `cc` or `gcc` on the PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


_p, _i, _i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
_SIGNATURES = {  # each C function's result and argument types
    "gpt2serve_gemv": (_i, [_i, _p, _i, _i, _p, _p, _p, _p, _i, _i]),
    "gpt2serve_decode": (_i, [_p, _i, _i, ctypes.c_float, _p, _i, _i, _p, _p, _p, _p, _i, _i, _i]),
    "gpt2serve_topk": (_i, [_p, _i64, _i64, _p, _i, _p, _p]),
    "gpt2serve_row_max": (None, [_p, _i, _i64, _p, _p, _i]),
    "gpt2serve_candidates": (_i64, [_p, _i, _i64, _p, _p, _p, _p, _i, _p, _i, _i]),
    "gpt2serve_rescore": (_i, [_p, _i, _i, _p, _i64, _p, _p, _i]),
    "gpt2serve_sketch_i8_available": (_i, []),
    "gpt2serve_sketch_i8": (_i, [_p, _p, _i, _i, _p, _i, _p, _p, _p, _i, _i]),
    "gpt2serve_uniform": (_i, [_p, _i64, _p, _i64, _p]),
    "gpt2serve_draw_top_k": (None, [_p, _i64, _p, _i, _p, _p, _p, ctypes.c_double, _p, _p, _i]),
    "gpt2serve_multinomial": (_i64, [_p, _p, _i64]),
    "gpt2serve_sort_values": (_i, [_p, _i64, _p]),
    "gpt2serve_top_p_apply": (_i64, [_p, _p, _p, _i64, ctypes.c_float, _p, _p]),
    "gpt2serve_near_max": (None, [_p, _i64, _p, _i, _p, _p]),
    "gpt2serve_mass": (None, [_p, _i64, _p, _p]),
    "gpt2serve_sort_values_rows": (None, [_p, _i, _i64, _p, _p, _i]),
    "gpt2serve_top_p_apply_rows": (None, [_p, _p, _p, _i, _i64, _p, _p, _p, _i]),
    "gpt2serve_multinomial_rows": (None, [_p, _p, _i, _i64, _p, _i]),
}


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (with the reason logged once) where they cannot be used here."""
    if isa() is None:
        log.info("gemv kernels off: the CPU lacks AVX2/FMA")
        return None
    cc, flags = compiler(), _flags()
    if cc is None:
        log.info("gemv kernels off: no C compiler (cc) found; using torch's kernels")
        return None
    try:
        try:
            lib = ctypes.CDLL(str(kernel_cache.build(cc, flags, SOURCES)))
        except OSError as exc:
            if flags == FLAGS:
                raise
            log.warning("the AVX-512 build of the gemv kernels failed (%s); building them for AVX2", exc)
            lib = ctypes.CDLL(str(kernel_cache.build(cc, FLAGS, SOURCES)))
    except OSError as exc:
        log.warning("gemv kernels off: building %s failed: %s", SOURCES[0].parent, exc)
        return None
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def available() -> bool:
    return library() is not None


def gemv(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """(M, K) float32 @ weight (N, K)^T, times `scale` (N,) per column if given, plus `bias` (N,).

    `weight` is float32, bfloat16, float16 or int8, contiguous, with K a multiple of 8; `x` is float32."""
    lib = library()
    if lib is None:
        raise RuntimeError("the gemv kernels are not available on this machine")
    rows, (n, k) = x.shape[0], weight.shape
    if not weight.is_contiguous() or weight.dtype not in FORMAT_CODES:
        raise ValueError(f"gemv needs a contiguous weight of {list(FORMAT_CODES)}, got {weight.dtype}")
    if k % K_MULTIPLE or x.shape[1] != k or x.dtype != torch.float32:
        raise ValueError(f"gemv needs float32 x (M, K) and K a multiple of 8: x {tuple(x.shape)}, K {k}")
    x = x if x.is_contiguous() else x.contiguous()
    y = torch.empty(rows, n, dtype=torch.float32)
    if rows == 0:
        return y
    rc = lib.gpt2serve_gemv(
        FORMAT_CODES[weight.dtype],
        x.data_ptr(),
        rows,
        k,
        weight.data_ptr(),
        None if scale is None else scale.data_ptr(),
        None if bias is None else bias.data_ptr(),
        y.data_ptr(),
        n,
        torch.get_num_threads(),
    )
    if rc != 0:
        raise ValueError(f"gemv refused x {tuple(x.shape)} @ weight {tuple(weight.shape)} {weight.dtype}")
    return y


# -- decode.c ----------------------------------------------------------------------------------------------


class _Matrix(ctypes.Structure):
    _fields_ = [
        ("fmt", ctypes.c_int),
        ("n", ctypes.c_int),
        ("k", ctypes.c_int),
        ("w", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("b", ctypes.c_void_p),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("ln1_w", "ln1_b", "ln2_w", "ln2_b")] + [
        (name, _Matrix) for name in ("attn", "proj", "fc", "out")
    ]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class DecodeLayers:
    """Every layer's weights for decode.c, gathered once. A layer is a dict: ln_1, ln_2 ((weight, bias)
    float32 pairs) and attn, proj, fc, out ((weight (N, K), scale or None, bias or None) as gemv takes).
    The tensors must stay alive and in place: `self.keep` holds them."""

    def __init__(self, layers: list[dict], n_head: int, eps: float):
        self.n_head, self.eps, self.n_layer = n_head, eps, len(layers)
        self.keep = layers
        self.table = (_Layer * len(layers))()
        for slot, layer in zip(self.table, layers, strict=True):
            for name in ("ln_1", "ln_2"):
                w, b = layer[name]
                setattr(slot, name.replace("_", "") + "_w", w.data_ptr())
                setattr(slot, name.replace("_", "") + "_b", b.data_ptr())
            for name in ("attn", "proj", "fc", "out"):
                w, scale, bias = layer[name]
                code, (n, k) = FORMAT_CODES[w.dtype], w.shape
                setattr(slot, name, _Matrix(code, n, k, w.data_ptr(), _ptr(scale), _ptr(bias)))


def decode(
    layers: DecodeLayers,
    x: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> torch.Tensor:
    """Run the one-token rows `x` (M, C) float32 through every layer in place (see decode.c): row i is
    the token of slot `slots[i]` at `positions[i]` (int64); caches (n_layer, n_slots, n_head, max_len, hs)
    float32, contiguous. Returns x."""
    lib = library()
    if lib is None:
        raise RuntimeError("the gemv kernels are not available on this machine")
    n_layer, n_slots, _, max_len, _ = k_cache.shape
    for t, dtype in ((x, torch.float32), (k_cache, torch.float32), (v_cache, torch.float32)):
        if t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"decode needs contiguous {dtype} activations and caches, got {t.dtype}")
    if slots.dtype != torch.long or positions.dtype != torch.long or n_layer != layers.n_layer:
        raise ValueError("decode needs int64 slots and positions and a cache of the model's layers")
    slots, positions = slots.contiguous(), positions.contiguous()
    rc = lib.gpt2serve_decode(
        layers.table,
        layers.n_layer,
        layers.n_head,
        layers.eps,
        x.data_ptr(),
        x.shape[0],
        x.shape[1],
        slots.data_ptr(),
        positions.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        n_slots,
        max_len,
        torch.get_num_threads(),
    )
    if rc == -2:
        raise MemoryError("decode: out of memory for its work buffers")
    if rc != 0:
        raise ValueError(f"decode refused x {tuple(x.shape)} with cache {tuple(k_cache.shape)}")
    return x


# -- sampling.c --------------------------------------------------------------------------------------------


def _library_for(x: torch.Tensor, dim: int) -> ctypes.CDLL | None:
    """The kernels, where they are built and `x` is a float32 CPU tensor of `dim` dimensions."""
    ok = x.dtype == torch.float32 and x.dim() == dim and x.device.type == "cpu"
    return library() if ok else None


def row_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`x.amax(dim=-1)` and `x.argmax(dim=-1)` of a 2-D float32 CPU tensor in one pass over each row, the
    rows on all threads (a NaN row: NaN, its index unspecified); None where the kernels are not built."""
    lib = _library_for(x, 2)
    if lib is None:
        return None
    x = x.contiguous()
    values, indices = torch.empty(x.shape[0], dtype=torch.float32), torch.empty(x.shape[0], dtype=torch.long)
    args = x.data_ptr(), x.shape[0], x.shape[1], values.data_ptr(), indices.data_ptr()
    lib.gpt2serve_row_max(*args, torch.get_num_threads())
    return values, indices


def topk(
    x: torch.Tensor, k: int, row_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`torch.topk(x.reshape(-1), k)` of a float32 CPU tensor, 1-D or 2-D, with `row_bias[r]` added to
    row r of a 2-D x first (the sums `x + row_bias[:, None]` holds), where its answer leaves no room for
    tie-breaking (k distinct values, each above every value left out); None where it would (or for a
    NaN, or where the kernels are not built). Indices are into the flattened x."""
    lib = _library_for(x, x.dim()) if x.dim() in (1, 2) else None
    if lib is None:
        return None
    x = x.contiguous()
    rows, cols = (1, x.numel()) if x.dim() == 1 else x.shape
    if row_bias is not None:
        row_bias = row_bias.to(torch.float32).contiguous()
        if x.dim() != 2 or row_bias.shape != (rows,):
            raise ValueError(f"row_bias must be ({rows},) for a 2-D x, got {tuple(row_bias.shape)}")
    bias = None if row_bias is None else row_bias.data_ptr()
    values, indices = torch.empty(k, dtype=torch.float32), torch.empty(k, dtype=torch.long)
    if lib.gpt2serve_topk(x.data_ptr(), rows, cols, bias, k, values.data_ptr(), indices.data_ptr()) != 0:
        return None
    return values, indices


def candidates(
    sketch: torch.Tensor,
    slack: torch.Tensor,
    r: torch.Tensor,
    k: int,
    e: torch.Tensor | None = None,
    wn: torch.Tensor | None = None,
    by_row: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, int] | None:
    """The tokens (ascending) that can be among some row's k largest logits, each row's exact logits
    lying within r[row] * slack (+ e[row] * wn, where given) of the (rows, V) float32 `sketch` (see
    head_sketch.py); with `by_row` (up to 64 rows), each row's own instead: (V,) int64 whose bit `row` says
    whether the token is that row's candidate, and how many (row, token) pairs that makes. The rows run on
    all threads. None for a NaN in the sketch, or where the kernels are not built."""
    lib = _library_for(sketch, 2)
    if lib is None:
        return None
    sketch, slack, r = (t.float().contiguous() for t in (sketch, slack, r))
    e, wn = (None, None) if e is None else (e.float().contiguous(), wn.float().contiguous())
    rows, n = sketch.shape
    if by_row and rows > 64:
        return None
    mark = torch.empty(n, dtype=torch.int64 if by_row else torch.uint8)
    second = (None, None) if e is None else (e.data_ptr(), wn.data_ptr())
    args = sketch.data_ptr(), rows, n, slack.data_ptr(), r.data_ptr(), *second, k, mark.data_ptr()
    count = lib.gpt2serve_candidates(*args, int(by_row), torch.get_num_threads())
    if count < 0:
        return None
    return (mark, count) if by_row else mark.nonzero().squeeze(1)


def rescore(x: torch.Tensor, weight: torch.Tensor, mark: torch.Tensor) -> torch.Tensor | None:
    """(M, V) float32: x[m] . weight[t] where bit m of mark[t] is set (`candidates(..., by_row=True)`), bit
    for bit gemv's float32 product, -inf elsewhere; each weight row read once. None where the AVX-512
    kernels are not built or the arguments are not float32 (M, K) and (V, K) CPU tensors, M <= 64."""
    lib = _library_for(x, 2)
    (m, k), n = x.shape, weight.shape[0]
    if lib is None or weight.dtype != torch.float32 or weight.shape[1] != k or mark.shape != (n,) or m > 64:
        return None
    x, weight, mark = x.contiguous(), weight.contiguous(), mark.contiguous()
    out = torch.full((m, n), float("-inf"))
    rc = lib.gpt2serve_rescore(x.data_ptr(), m, k, weight.data_ptr(), n, mark.data_ptr(), out.data_ptr(),
                               torch.get_num_threads())  # fmt: skip
    return None if rc != 0 else out


# -- sketch.c ----------------------------------------------------------------------------------------------


def sketch_int8_available() -> bool:
    """Whether `sketch_int8` runs here: the AVX-512 build on a CPU with VNNI."""
    lib = library()
    return lib is not None and lib.gpt2serve_sketch_i8_available() == 1


SKETCH_BLOCK_ROWS, SKETCH_TASK_BLOCKS = 16, 3  # sketch.c's packing: 16-row blocks, 3 to a task


def pack_sketch(weight: torch.Tensor) -> torch.Tensor:
    """An int8 (N, K) matrix (K a multiple of 4) as `sketch_int8` reads it: blocks of 16 rows (zero rows
    past N, up to a multiple of 3 blocks), each as K/4 groups of 16 x 4 bytes (row c's inputs 4g .. 4g+3
    at [block, g, c])."""
    n, k = weight.shape
    if weight.dtype != torch.int8 or k % 4:
        raise ValueError(f"pack_sketch needs int8 (N, K) with K a multiple of 4: {weight.dtype} {k}")
    blocks = -(-n // SKETCH_BLOCK_ROWS)
    blocks += -blocks % SKETCH_TASK_BLOCKS
    padded = torch.zeros(blocks * SKETCH_BLOCK_ROWS, k, dtype=torch.int8)
    padded[:n] = weight
    return padded.view(blocks, SKETCH_BLOCK_ROWS, k // 4, 4).permute(0, 2, 1, 3).contiguous()


def sketch_int8(
    x: torch.Tensor, x_scale: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, row_sums: torch.Tensor
) -> torch.Tensor | None:
    """(M, N) float32: x_scale[m] * scale[n] * ((x[m] - 128) . weight[n]) for uint8 `x` (M, K) and the int8
    `weight` (N, K) that `packed` (`pack_sketch(weight)`) holds, with `row_sums` (N,) int32 its rows'
    sums, the sums exact in integers; None where `sketch_int8_available()` is false."""
    lib = library()
    (rows, k), n = x.shape, row_sums.numel()
    kinds = x.dtype, packed.dtype, row_sums.dtype
    blocks = packed.shape[0]
    shape_ok = packed.dim() == 4 and packed.shape[1:] == (k // 4, SKETCH_BLOCK_ROWS, 4) and k % 4 == 0
    if kinds != (torch.uint8, torch.int8, torch.int32) or not shape_ok or blocks * SKETCH_BLOCK_ROWS < n:
        raise ValueError(f"sketch_int8 needs uint8 x (M, K), pack_sketch's weight: {x.dtype} {packed.shape}")
    if lib is None or rows == 0:
        return None
    x, x_scale = x.contiguous(), x_scale.float().contiguous()
    y = torch.empty(rows, n, dtype=torch.float32)
    w = packed.data_ptr(), blocks, scale.data_ptr(), row_sums.data_ptr()
    rc = lib.gpt2serve_sketch_i8(
        x.data_ptr(), x_scale.data_ptr(), rows, k, *w, y.data_ptr(), n, torch.get_num_threads()
    )
    return None if rc != 0 else y


def uniform_at(
    generator: torch.Generator, n: int, at: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The draws at the ascending indices `at` of `torch.empty(n, dtype=torch.float64).uniform_(
    generator=generator)`, and the generator state that call would leave (for `generator.set_state`),
    without drawing the others (~30 us against ~500 us for GPT-2's vocabulary); `generator` itself is
    not changed. None where any of the n draws is exactly 0 (torch.multinomial treats that case
    specially), or where torch's generator state is not laid out as sampling.c reads it (checked once)."""
    lib = library()
    if lib is None or generator.device.type != "cpu" or not _generator_layout_understood():
        return None
    state, at = generator.get_state(), at.to(torch.long).contiguous()
    out = torch.empty(at.numel(), dtype=torch.float64)
    if lib.gpt2serve_uniform(state.data_ptr(), n, at.data_ptr(), at.numel(), out.data_ptr()) != 0:
        return None
    return out, state


def draw_top_k(
    x: torch.Tensor,
    rows: list[int],
    temperature: list[float],
    top_k: list[int],
    threshold: list[float],
    states: list[torch.Tensor],
    margin: float,
) -> list[int] | None:
    """For each of `rows` of the (B, V) float32 CPU logits `x`: the token that HF's warpers (that row's
    temperature, top-k, and top-p as `threshold`, float32(1 - top_p), negative for none) and
    torch.multinomial draw, from its top-k values alone, with the generator whose get_state() bytes are
    that row's `states` entry (advanced in place, for set_state), or -1 where the caller must decide
    (sampling.c's draw_top_k_row: ties, a call within `margin`); rows drawn on all threads. None where
    the kernels are not built or do not read torch's generator."""
    lib = _library_for(x, 2)
    if lib is None or not x.is_contiguous() or not _generator_layout_understood():
        return None
    n = len(rows)
    tokens = torch.empty(n, dtype=torch.long)
    pick, k = torch.tensor(rows, dtype=torch.long), torch.tensor(top_k, dtype=torch.int32)
    t, cut = (torch.tensor(v, dtype=torch.float32) for v in (temperature, threshold))
    pointers = (ctypes.c_void_p * n)(*(s.data_ptr() for s in states))
    args = x.data_ptr(), x.shape[1], pick.data_ptr(), n, t.data_ptr(), k.data_ptr(), cut.data_ptr(), margin
    lib.gpt2serve_draw_top_k(*args, pointers, tokens.data_ptr(), torch.get_num_threads())
    return tokens.tolist()


def multinomial(generator: torch.Generator, probs: torch.Tensor) -> tuple[int, torch.Tensor] | None:
    """`torch.multinomial(probs, 1, generator=generator)` for a 1-D float32 CPU row: the token, and the
    generator state torch leaves (for `generator.set_state`); `generator` itself is not changed. None for
    a row torch refuses (an entry negative, inf or NaN, or none positive: torch raises), where a uniform
    draw is exactly 0 (torch's own special case) or where `uniform_at` would be refused."""
    lib = _library_for(probs, 1)
    if lib is None or generator.device.type != "cpu" or not _generator_layout_understood():
        return None
    state, probs = generator.get_state(), probs.contiguous()
    token = lib.gpt2serve_multinomial(state.data_ptr(), probs.data_ptr(), probs.numel())
    return None if token < 0 else (token, state)


@functools.cache
def _generator_layout_understood() -> bool:
    """Whether sampling.c reproduces this torch's CPU generator: draws and final state, over lengths that
    cross its 624-word refills, from a fresh seed and from a state mid-way."""
    lib = library()
    if lib is None:
        return False
    ours, theirs = torch.Generator().manual_seed(1234), torch.Generator().manual_seed(1234)
    for n in (1, 311, 313, 50257, 7):
        state, at = ours.get_state(), torch.arange(0, n, 3)
        out = torch.empty(at.numel(), dtype=torch.float64)
        too_short = state.numel() < 24 + 624 * 8  # the generator's words, after its counters
        if too_short or lib.gpt2serve_uniform(state.data_ptr(), n, at.data_ptr(), at.numel(), out.data_ptr()):
            return False
        ours.set_state(state)
        expected = torch.empty(n, dtype=torch.float64).uniform_(generator=theirs)
        if not (torch.equal(out, expected[at]) and torch.equal(ours.get_state(), theirs.get_state())):
            log.warning("torch's CPU generator is not laid out as sampling.c expects: sampling runs slower")
            return False
    return True


def sort_values(x: torch.Tensor) -> torch.Tensor | None:
    """torch.sort(x).values of a 1-D float32 CPU row, without the indices (see nucleus.c); None where
    the row's largest value is not finite (a NaN, +inf, or every value -inf) or the kernels are not
    built."""
    lib = _library_for(x, 1)
    if lib is None:
        return None
    x = x.contiguous()
    out = torch.empty_like(x)
    return out if lib.gpt2serve_sort_values(x.data_ptr(), x.numel(), out.data_ptr()) == 0 else None


def sort_values_rows(x: torch.Tensor) -> tuple[torch.Tensor, list[bool]] | None:
    """`sort_values` of each row of a 2-D float32 CPU tensor, the rows on all threads: the sorted rows
    and, per row, whether it was sorted (False: its largest value is not finite, the row unspecified);
    None where the kernels are not built."""
    lib = _library_for(x, 2)
    if lib is None:
        return None
    x = x.contiguous()
    out, rc = torch.empty_like(x), torch.empty(x.shape[0], dtype=torch.int32)
    args = x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr(), rc.data_ptr()
    lib.gpt2serve_sort_values_rows(*args, torch.get_num_threads())
    return out, [c == 0 for c in rc.tolist()]


def top_p_apply_rows(
    x: torch.Tensor, ordered: torch.Tensor, probs: torch.Tensor, thresholds: list[float]
) -> tuple[torch.Tensor, list[bool]] | None:
    """`top_p_apply` of each row of the 2-D x (row i with `thresholds[i]`, float32 1 - top_p), the rows
    on all threads: the masked rows and, per row, whether it was decided (False: a straddling tie, the
    row unspecified); None where the kernels are not built."""
    lib = _library_for(x, 2)
    if lib is None:
        return None
    x, probs, out = x.contiguous(), probs.contiguous(), torch.empty_like(x)
    t, kept = torch.tensor(thresholds, dtype=torch.float32), torch.empty(x.shape[0], dtype=torch.long)
    args = x.data_ptr(), ordered.contiguous().data_ptr(), probs.data_ptr(), x.shape[0], x.shape[1]
    lib.gpt2serve_top_p_apply_rows(*args, t.data_ptr(), out.data_ptr(), kept.data_ptr(),
                                   torch.get_num_threads())  # fmt: skip
    return out, [k >= 0 for k in kept.tolist()]


def multinomial_rows(states: list[torch.Tensor], probs: torch.Tensor) -> list[int] | None:
    """`multinomial` of each row of the 2-D float32 probs, row i with the generator whose get_state()
    bytes are `states[i]` (advanced in place, for set_state), the rows on all threads: each row's token,
    or -1 where `multinomial` would give None (that row's state is then not to be used). None where the
    kernels are not built or do not read torch's generator."""
    lib = _library_for(probs, 2)
    if lib is None or not _generator_layout_understood():
        return None
    probs, n = probs.contiguous(), len(states)
    tokens = torch.empty(n, dtype=torch.long)
    pointers = (ctypes.c_void_p * n)(*(s.data_ptr() for s in states))
    args = pointers, probs.data_ptr(), n, probs.shape[1], tokens.data_ptr()
    lib.gpt2serve_multinomial_rows(*args, torch.get_num_threads())
    return [max(t, -1) for t in tokens.tolist()]


def near_max(x: torch.Tensor, gaps: tuple[float, ...]) -> tuple[float, list[int]] | None:
    """The largest value of a 1-D float32 CPU row and, per gap, how many values are >= largest - gap
    (on the calling thread); None where the kernels are not built."""
    lib = _library_for(x, 1)
    if lib is None:
        return None
    x, g = x.contiguous(), (ctypes.c_float * len(gaps))(*gaps)
    counts, top = (ctypes.c_int64 * len(gaps))(), ctypes.c_float()
    lib.gpt2serve_near_max(x.data_ptr(), x.numel(), g, len(gaps), counts, ctypes.byref(top))
    return top.value, list(counts)


def mass(probs: torch.Tensor) -> tuple[float, float] | None:
    """(sum in float64, largest) of a 1-D float32 CPU row, on the calling thread alone (torch's sum and
    max share a long row among the OpenMP threads); NaN where the row holds one. None where the kernels
    are not built."""
    lib = _library_for(probs, 1)
    if lib is None:
        return None
    probs, total, peak = probs.contiguous(), ctypes.c_double(), ctypes.c_float()
    lib.gpt2serve_mass(probs.data_ptr(), probs.numel(), ctypes.byref(total), ctypes.byref(peak))
    return total.value, peak.value


def top_p_apply(
    x: torch.Tensor, ordered: torch.Tensor, probs: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, float] | None:
    """HF's top-p of the 1-D float32 row `x`, given `ordered` (sort_values(x)) and `probs` (torch's
    softmax of `ordered`): x with the removed scores -inf, and the smallest kept score; None where equal
    values straddle the cut (HF's unstable sort decides) or the kernels are not built."""
    lib = _library_for(x, 1)
    if lib is None:
        return None
    x, probs, out, cut = x.contiguous(), probs.contiguous(), torch.empty_like(x), ctypes.c_float()
    args = x.data_ptr(), ordered.data_ptr(), probs.data_ptr(), x.numel()
    kept = lib.gpt2serve_top_p_apply(*args, threshold, out.data_ptr(), ctypes.byref(cut))
    return None if kept < 0 else (out, cut.value)
