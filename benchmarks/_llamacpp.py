"""llama.cpp as a peer: the benchmark checkpoint as GGUF, llama-cpp-python's decode loop, and its server.

Needs the `[llamacpp]` extra: llama-cpp-python ships as a source distribution only, so installing it
builds llama.cpp (up to about 20 minutes on 2 cores, 7.5 on a Zen 5; `CMAKE_ARGS="-DGGML_NATIVE=ON"`
builds for this CPU). Nothing here imports `llama_cpp` until a runner needs it, so the other peers run
without the extra.

The GGUF files come from llama.cpp's own `convert_hf_to_gguf.py` (`--outtype f32|bf16|q8_0`) run on the
Hugging Face export of the same weights the other engines get. The script is taken from `$LLAMA_CPP_SRC`
(a llama.cpp checkout) or else from the source distribution of the installed llama-cpp-python, which
vendors the llama.cpp it was built from (fetched once with `pip download`); the script uses the gguf-py
vendored beside it (newer than PyPI's gguf 0.19.0), and PyPI's `gguf` reads the result back here to
record which tensor types the file holds.

The decode loop is the one a llama-cpp-python user writes for greedy decoding at full control: `eval`
the prompt in one batch, then per step read the last position's logits, take the argmax and `eval` that
one token. llama-cpp-python keeps one sequence per context and has no beam search, so only greedy
single-sequence shapes run (`runs_shape`); the others are listed as not run.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tarfile
from collections import Counter
from importlib import metadata
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGE = "llama-cpp-python"
GGUF_TYPES = {"float32": "f32", "bfloat16": "bf16", "int8": "q8_0"}  # gpt2serve precision -> --outtype
N_CTX = 1024  # GPT-2's context
NOT_RUN = (
    "llama-cpp-python decodes one sequence per context, samples one token per step and has no beam search"
)


def runs_shape(shape) -> bool:
    """Whether llama-cpp-python can run `shape` as one request: greedy, one sequence."""
    return shape.n == 1 and shape.num_beams == 1 and not shape.do_sample


def _version() -> str:
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError as exc:
        raise RuntimeError(f"{PACKAGE} is not installed: pip install 'gpt2serve[llamacpp]'") from exc


def converter_script(cache: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py: `$LLAMA_CPP_SRC`'s, or the installed version's sdist's."""
    if os.environ.get("LLAMA_CPP_SRC"):
        return Path(os.environ["LLAMA_CPP_SRC"]) / "convert_hf_to_gguf.py"
    version = _version()
    root = cache / f"llama_cpp_python-{version}"
    script = root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if not script.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"{PACKAGE}=={version}", "-d", str(cache)]  # fmt: skip
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        with tarfile.open(cache / f"llama_cpp_python-{version}.tar.gz") as sdist:
            sdist.extractall(cache, filter="data")
    return script


def convert_gguf(hf_dir: Path, out: Path, precision: str, cache: Path) -> Path:
    """`hf_dir` as a GGUF file of `precision`'s type (kept if already there)."""
    if out.is_file():
        return out
    tmp = out.with_suffix(".partial")
    cmd = [sys.executable, str(converter_script(cache)), str(hf_dir), "--outtype", GGUF_TYPES[precision],
           "--outfile", str(tmp)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({done.returncode}):\n{done.stderr[-2000:]}")
    tmp.rename(out)
    return out


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each type a GGUF file holds, e.g. {"Q8_0": 49, "F32": 99}."""
    from gguf import GGUFReader

    return dict(Counter(t.tensor_type.name for t in GGUFReader(str(path)).tensors))


class LlamaCppRunner:
    """llama-cpp-python's `Llama`, one token evaluated per step, the greedy token read from the logits."""

    engine = "llamacpp"

    def __init__(self, gguf: Path, precision: str, threads: int):
        import llama_cpp
        import numpy as np

        self._np = np
        self.precision = precision
        self.llm = llama_cpp.Llama(
            model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=N_CTX,
            logits_all=False, verbose=False,
        )  # fmt: skip
        self.n_vocab = self.llm.n_vocab()
        system = llama_cpp.llama_print_system_info().decode().strip()
        self.compute = f"{GGUF_TYPES[precision].upper()} ({llama_cpp.__version__}; {system})"

    def _greedy(self) -> int:
        # logits_all=False keeps only the last position's logits, in the context (Llama.scores stays empty)
        logits = self._np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,))
        return int(logits.argmax())

    def run(self, shape, prompt_ids: list[int], seed: int) -> list[int]:
        if not runs_shape(shape):
            raise ValueError(f"llama.cpp cannot run {shape.name}: {NOT_RUN}")
        self.llm.reset()
        self.llm.eval(prompt_ids)
        tokens = [self._greedy()]
        while len(tokens) < shape.new_tokens:
            self.llm.eval(tokens[-1:])
            tokens.append(self._greedy())
        return [len(tokens)]

    def close(self) -> None:
        self.llm.close()
        del self.llm


def server_command(gguf: Path, port: int, threads: int) -> list[str]:
    """`python -m llama_cpp.server` as deployed for many callers: requests queue one after another
    (`--interrupt_requests False`: by default a new request cuts the one streaming short)."""
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
            "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
            "--n_ctx", str(N_CTX), "--interrupt_requests", "False", "--model_alias", "gpt-2",
            "--verbose", "False"]  # fmt: skip
