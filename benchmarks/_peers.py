"""Request shapes and the runners that execute them: gpt2serve's engine, transformers, CTranslate2 and
llama.cpp (_llamacpp.py).

Every runner takes the same prompt and a `Shape` and returns how many tokens each returned sequence got,
so bench_engine.py can time them alike. EOS is disabled everywhere (min_new_tokens in transformers,
min_length in CTranslate2, stop_at_eos=False in gpt2serve, a fixed step count in llama.cpp), so every
engine generates exactly `shape.new_tokens` tokens per sequence.

Each runner lives in its own process (`RemoteRunner`), as each engine would in production. This matters
beyond memory: torch's OpenMP runtime (libgomp) spins its idle worker threads between parallel regions
only while the process's OpenMP threads do not outnumber the cores, so a process that has run torch code
on two threads (say transformers in the main thread and gpt2serve's engine thread) makes every worker
sleep between operations, which costs gpt2serve ~10% per step. gpt2serve's runner therefore loads its
engine in a loader thread that exits, as `gpt2serve serve` does.
"""

from __future__ import annotations

import gc
import json
import multiprocessing
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from _llamacpp import LlamaCppRunner

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_TOKENIZER = ROOT / "src" / "gpt2serve" / "data" / "gpt2-tokenizer"
EOS = 50256


@dataclass(frozen=True)
class Shape:
    """One request: how to decode and how many new tokens per sequence."""

    name: str
    label: str
    new_tokens: int
    n: int = 1  # sequences returned
    do_sample: bool = False
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    temperature: float = 1.0
    num_beams: int = 1
    no_repeat_ngram_size: int = 0
    prompt_tokens: int = 0  # 0: bench_engine's 8-token prompt; else a prompt of this many tokens


SHAPES: dict[str, Shape] = {
    "greedy": Shape("greedy", "greedy, 1 seq, 50 new", 50),
    "top_p": Shape("top_p", "sample top-p 0.9, 3 seqs, 50 new", 50, n=3, do_sample=True, top_p=0.9),
    "beam": Shape(
        "beam", "beam 5, 3 returned, ngram 2, 50 new", 50, n=3, num_beams=5, no_repeat_ngram_size=2
    ),
    # The seed API's default request: mode sample-top-p (top_k 50, top_p 0.92, temperature 1),
    # 3 sequences, max_length 100 (an 8-token prompt leaves 92 new tokens).
    "seed": Shape(
        "seed",
        "seed default: top-p 0.92 top-k 50, 3 seqs, max_length 100",
        92,
        n=3,
        do_sample=True,
        top_k=50,
        top_p=0.92,
    ),
    # A long prompt: the time to read it (one pass over the weights for 500 rows) is most of the request.
    "long_prompt": Shape("long_prompt", "greedy, 1 seq, 500-token prompt, 20 new", 20, prompt_tokens=500),
}


def free() -> None:
    gc.collect()


# -- a Hugging Face checkpoint of gpt2serve's weights -------------------------------------------------


def export_hf(loaded, path: Path) -> Path:
    """Write `loaded` (a gpt2serve LoadedModel) as a Hugging Face GPT-2 checkpoint, without building a
    transformers model: config.json, model.safetensors ("transformer." names) and the tokenizer. The
    config names the architecture and `n_ctx` as the published GPT-2 checkpoints do (llama.cpp's
    convert_hf_to_gguf.py reads both)."""
    from safetensors.torch import save_file
    from transformers import GPT2Config

    path.mkdir(parents=True, exist_ok=True)
    c = loaded.config
    GPT2Config(
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_embd=c.n_embd,
        n_positions=c.n_positions,
        vocab_size=c.vocab_size,
        layer_norm_epsilon=c.layer_norm_epsilon,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        tie_word_embeddings=True,
        architectures=["GPT2LMHeadModel"],
        n_ctx=c.n_positions,
    ).save_pretrained(path)
    tensors = {"transformer." + k: v.contiguous() for k, v in loaded.state_dict.items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        shutil.copy(BUNDLED_TOKENIZER / name, path / name)
    (path / "DONE").write_text(loaded.name)
    return path


def convert_ct2(hf_dir: Path, out: Path, quantization: str) -> Path:
    """Convert the checkpoint with CTranslate2's TransformersConverter (kept if already there)."""
    from ctranslate2.converters import TransformersConverter

    if not (out / "model.bin").is_file():
        TransformersConverter(str(hf_dir), low_cpu_mem_usage=True).convert(
            str(out), quantization=quantization, force=True
        )
    return out


# -- runners --------------------------------------------------------------------------------------------


def load_engine(spec: str, precision: str, threads: int, kernels: str = "auto"):
    """gpt2serve's Engine, started, loaded in a thread that exits (as `gpt2serve serve` loads it)."""
    from gpt2serve.engine.config import EngineConfig
    from gpt2serve.engine.engine import Engine

    config = EngineConfig(  # one request at a time: it may hold every slot (beam 5)
        dtype=precision,
        max_batch_size=8,
        max_request_share=1.0,
        request_timeout_s=None,
        threads=threads,
        cpu_kernels=kernels,
    )
    loaded: dict = {}
    loader = threading.Thread(target=lambda: loaded.update(engine=Engine.load(spec, config)))
    loader.start()
    loader.join()
    if "engine" not in loaded:
        raise RuntimeError(f"Engine.load({spec!r}, dtype={precision}) failed; see the log above")
    loaded["engine"].start()
    return loaded["engine"]


def sampling_params(shape: Shape, seed: int):
    """gpt2serve's SamplingParams for `shape` (EOS off, so every sequence gets all its tokens)."""
    from gpt2serve.engine.params import SamplingParams

    return SamplingParams(
        do_sample=shape.do_sample,
        top_k=shape.top_k,
        top_p=shape.top_p,
        temperature=shape.temperature,
        num_beams=shape.num_beams,
        n=shape.n,
        max_new_tokens=shape.new_tokens,
        no_repeat_ngram_size=shape.no_repeat_ngram_size,
        stop_at_eos=False,
        seed=seed if shape.do_sample else None,
    )


class GPT2ServeRunner:
    """gpt2serve's Engine.generate_sync, one request at a time."""

    engine = "gpt2serve"

    def __init__(self, spec: str, precision: str, threads: int):
        self.precision = self.compute = precision
        self.eng = load_engine(spec, precision, threads)

    def run(self, shape: Shape, prompt_ids: list[int], seed: int) -> list[int]:
        prompt = self.eng.tokenizer.decode(prompt_ids)  # the engine takes text: it must encode back
        if self.eng.tokenizer.encode(prompt) != prompt_ids:
            raise ValueError("the prompt's token ids do not survive decoding and encoding again")
        result = self.eng.generate_sync(prompt, sampling_params(shape, seed))
        return [len(o.token_ids) for o in result.outputs]

    def close(self) -> None:
        self.eng.stop()
        del self.eng
        free()


class TransformersRunner:
    """transformers' GPT2LMHeadModel.generate."""

    engine = "transformers"

    def __init__(self, hf_dir: Path, precision: str, threads: int):
        from transformers import GPT2LMHeadModel

        torch.set_num_threads(threads)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[precision]
        self.precision = precision
        self.model = GPT2LMHeadModel.from_pretrained(str(hf_dir), dtype=dtype).eval()
        self.compute = str(dtype).removeprefix("torch.")

    @torch.inference_mode()
    def run(self, shape: Shape, prompt_ids: list[int], seed: int) -> list[int]:
        torch.manual_seed(seed)
        ids = torch.tensor([prompt_ids])
        kw: dict = dict(
            num_beams=shape.num_beams,
            no_repeat_ngram_size=shape.no_repeat_ngram_size,
            num_return_sequences=shape.n,
            do_sample=shape.do_sample,
        )
        if shape.do_sample:  # top_k 0 is "off": leave it out (this checkpoint sets no generation defaults)
            kw |= dict(top_p=shape.top_p, temperature=shape.temperature) | (
                {"top_k": shape.top_k} if shape.top_k else {}
            )
        if shape.num_beams > 1:
            kw["early_stopping"] = True
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=shape.new_tokens,
            min_new_tokens=shape.new_tokens,
            pad_token_id=EOS,
            **kw,
        )
        return [len(row) - len(prompt_ids) for row in out.tolist()]

    def close(self) -> None:
        del self.model
        free()


class CT2Runner:
    """CTranslate2's Generator.generate_batch on a model converted with `quantization`."""

    engine = "ctranslate2"

    def __init__(self, ct2_dir: Path | None, precision: str, threads: int):
        import ctranslate2

        self.precision = precision
        supported = ctranslate2.get_supported_compute_types("cpu")
        if precision not in supported:
            raise RuntimeError(
                f"CTranslate2 has no {precision} compute type on this CPU ({sorted(supported)})"
            )
        self.gen = ctranslate2.Generator(
            str(ct2_dir), device="cpu", compute_type=precision, intra_threads=threads, inter_threads=1
        )
        self.compute = self.gen.compute_type
        self.vocab = json.loads((ct2_dir / "vocabulary.json").read_text())
        self._ct2 = ctranslate2

    def run(self, shape: Shape, prompt_ids: list[int], seed: int) -> list[int]:
        self._ct2.set_random_seed(seed)
        tokens = [self.vocab[i] for i in prompt_ids]
        sampling = (
            dict(
                sampling_topk=shape.top_k if shape.do_sample else 1,
                sampling_topp=shape.top_p,
                sampling_temperature=shape.temperature,
            )
            if shape.do_sample
            else {}
        )
        res = self.gen.generate_batch(
            [tokens],
            max_length=shape.new_tokens,
            min_length=shape.new_tokens,
            include_prompt_in_result=False,
            beam_size=shape.num_beams,
            num_hypotheses=shape.n,
            no_repeat_ngram_size=shape.no_repeat_ngram_size,
            **sampling,
        )
        return [len(seq) for seq in res[0].sequences_ids]

    def close(self) -> None:
        del self.gen
        free()


RUNNERS = {
    "gpt2serve": GPT2ServeRunner,
    "transformers": TransformersRunner,
    "ctranslate2": CT2Runner,
    "llamacpp": LlamaCppRunner,
}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _worker(conn, engine: str, precision: str, source, threads: int) -> None:
    """The loop of a runner's process: build the runner, then time the requests it is sent."""
    try:
        runner = RUNNERS[engine](source, precision, threads)
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", str(runner.compute)))
    while (msg := conn.recv()) is not None:
        shape, prompt_ids, seed = msg
        start = time.perf_counter()
        lengths = runner.run(shape, prompt_ids, seed)
        conn.send((time.perf_counter() - start, lengths, _status_kb("VmHWM")))
    runner.close()
    conn.send("closed")


class RemoteRunner:
    """A runner in a process of its own (spawned: a fresh interpreter, no inherited thread pools)."""

    def __init__(self, engine: str, precision: str, source, threads: int):
        self.engine, self.precision = engine, precision
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        args = (child, engine, precision, source, threads)
        self.proc = ctx.Process(target=_worker, args=args, daemon=True)
        self.proc.start()
        kind, info = self.conn.recv()
        if kind == "error":
            self.proc.join()
            raise RuntimeError(info)
        self.compute = info
        self.peak_rss_kb = 0

    def run(self, shape: Shape, prompt_ids: list[int], seed: int) -> tuple[float, list[int]]:
        """(seconds, new tokens of each returned sequence), timed inside the runner's process."""
        self.conn.send((shape, prompt_ids, seed))
        seconds, lengths, self.peak_rss_kb = self.conn.recv()
        return seconds, lengths

    def close(self) -> None:
        self.conn.send(None)
        self.conn.recv()
        self.proc.join()
