"""Request shapes and the runners that execute them: gpt2serve's engine, transformers and CTranslate2.

Every runner takes the same prompt token ids and a `Shape` and returns how many tokens each returned
sequence got, so bench_engine.py can time them alike. EOS is disabled everywhere (min_new_tokens in
transformers, min_length in CTranslate2, stop_at_eos=False in gpt2serve), so every engine generates
exactly `shape.new_tokens` tokens per sequence.
"""

from __future__ import annotations

import gc
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

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
}


def free() -> None:
    gc.collect()


# -- a Hugging Face checkpoint of gpt2serve's weights -------------------------------------------------


def export_hf(loaded, path: Path) -> Path:
    """Write `loaded` (a gpt2serve LoadedModel) as a Hugging Face GPT-2 checkpoint, without building a
    transformers model: config.json, model.safetensors ("transformer." names) and the tokenizer."""
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

    def __init__(self, ct2_dir: Path, precision: str, threads: int):
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
