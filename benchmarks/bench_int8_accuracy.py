"""int8 (and bfloat16) against float32 on several checkpoints: the measurement of
tests/engine/test_int8_accuracy.py (200 teacher-forced positions, a tiny GPT-2 rescaled to predict like a
trained one: _accuracy.py), repeated for checkpoints of different random seeds, on this machine's kernels.

The test runs one checkpoint (seed 0); this shows how much the two figures move from one set of weights
to the next (one position is 0.5 % of the top-1 agreement, and most disagreements are near-ties).
`--long-prompt N` takes the positions of one N-token prompt instead (the test's prompts joined): past
`GPT2.fused_rows` tokens a prompt runs layer by layer, its products on oneDNN where it has them.

    python benchmarks/bench_int8_accuracy.py [--seeds 0-7] [--formats int8,bfloat16] [--long-prompt N]
                                             [--out NAME|FILE.json|-]

Prints one JSON object: {"kernels", "results": [{seed, format, mean_kl, top1_agreement}], "summary", and
what _results.record adds}, written to benchmarks/results/<machine>/int8_accuracy_seeds.json
(int8_accuracy_long_prompt.json with --long-prompt) unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import _accuracy as accuracy  # noqa: E402
from _results import add_out_argument, command_line, record, save  # noqa: E402

from gpt2serve.engine.config import ModelConfig  # noqa: E402
from gpt2serve.engine.loader import load_checkpoint  # noqa: E402
from gpt2serve.engine.model import kernel_family  # noqa: E402
from gpt2serve.engine.tokenizer import Tokenizer  # noqa: E402


def rescaled(seed: int, folder: Path, n_positions: int = 128):
    """The test's checkpoint for `seed`, rescaled as the test's `state` fixture does."""
    loaded = load_checkpoint(str(accuracy.tiny_checkpoint(folder / f"seed{seed}", seed, n_positions)))
    return loaded.config, accuracy.rescale(loaded.state_dict)


def seeds(text: str) -> list[int]:
    if "-" in text:
        first, last = text.split("-")
        return list(range(int(first), int(last) + 1))
    return [int(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0-7", help="a range (0-7) or a comma list")
    parser.add_argument("--formats", default="int8,bfloat16")
    parser.add_argument("--long-prompt", type=int, default=0, help="one prompt of this many tokens")
    add_out_argument(parser, "int8_accuracy_seeds, or int8_accuracy_long_prompt with --long-prompt")
    args = parser.parse_args(argv)
    tokenizer = Tokenizer.bundled()
    prompts = [tokenizer.encode(text)[: accuracy.TOKENS_PER_PROMPT] for text in accuracy.PROMPTS]
    if args.long_prompt:
        prompts = [tokenizer.encode(" ".join(accuracy.PROMPTS) * 4)[: args.long_prompt]]
    n_positions = max(128, len(prompts[0]))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds(args.seeds):
            config, sd = rescaled(seed, Path(tmp), n_positions)
            ref = accuracy.log_probs(config, sd, "float32", prompts)
            p = ref.exp()
            for fmt in args.formats.split(","):
                q = accuracy.log_probs(config, sd, fmt, prompts)
                kl = (p * (ref - q)).sum(-1).mean().item()
                agreement = (ref.argmax(-1) == q.argmax(-1)).float().mean().item()
                row = {
                    "seed": seed,
                    "format": fmt,
                    "mean_kl": round(kl, 5),
                    "top1_agreement": round(agreement, 4),
                }
                print(json.dumps(row), file=sys.stderr, flush=True)
                results.append(row)
    summary = {}
    for fmt in args.formats.split(","):
        rows = [r for r in results if r["format"] == fmt]
        summary[fmt] = {
            "mean_kl_max": max(r["mean_kl"] for r in rows),
            "top1_mean": round(statistics.mean(r["top1_agreement"] for r in rows), 4),
            "top1_min": min(r["top1_agreement"] for r in rows),
            "checkpoints_below_97pct": sum(r["top1_agreement"] < 0.97 for r in rows),
        }
    kernels = kernel_family("auto", ModelConfig(n_embd=64), torch.device("cpu"))
    positions = sum(len(ids) for ids in prompts)
    report = {"kernels": kernels, "positions": positions, "prompts": len(prompts)}
    report = record(command_line(argv), report | {"results": results, "summary": summary})
    print(json.dumps(report, indent=1))
    save(report, args.out, "int8_accuracy_long_prompt" if args.long_prompt else "int8_accuracy_seeds")


if __name__ == "__main__":
    main()
