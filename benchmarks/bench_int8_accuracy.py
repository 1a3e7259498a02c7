"""int8 (and bfloat16) against float32 on several checkpoints: the measurement of
tests/engine/test_int8_accuracy.py (200 teacher-forced positions, a tiny GPT-2 rescaled to predict like a
trained one), repeated for checkpoints of different random seeds, on this machine's kernels.

The test runs one checkpoint (seed 0); this shows how much the two figures move from one set of weights
to the next (one position is 0.5 % of the top-1 agreement, and most disagreements are near-ties).
`--long-prompt N` takes the positions of one N-token prompt instead (the test's prompts joined): past
`GPT2.fused_rows` tokens a prompt runs layer by layer, its products on oneDNN where it has them.

    python benchmarks/bench_int8_accuracy.py [--seeds 0-7] [--formats int8,bfloat16] [--long-prompt N]
                                             [--out FILE.json]

Prints one JSON object: {"kernels", "results": [{seed, format, mean_kl, top1_agreement}], "summary"}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from gpt2serve.engine.config import ModelConfig  # noqa: E402
from gpt2serve.engine.loader import load_checkpoint  # noqa: E402
from gpt2serve.engine.model import kernel_family  # noqa: E402
from gpt2serve.engine.tokenizer import Tokenizer  # noqa: E402
from tests.checkpoints import make_checkpoint  # noqa: E402
from tests.engine import test_int8_accuracy as accuracy  # noqa: E402


def rescaled(seed: int, folder: Path, n_positions: int = 128):
    """The test's checkpoint for `seed`, rescaled as the test's `state` fixture does."""
    shape = dict(n_layer=2, n_head=4, n_embd=64, n_positions=n_positions)
    path = make_checkpoint(folder / f"seed{seed}", seed=seed, **shape)
    loaded = load_checkpoint(str(path))
    sd = {}
    for name, tensor in loaded.state_dict.items():
        if name in ("wte.weight", "wpe.weight"):
            sd[name] = tensor * (accuracy.EMBED_STD / accuracy.INIT_STD)
        elif name.startswith("h.") and name.endswith(".weight") and ".ln_" not in name:
            sd[name] = tensor * (accuracy.BLOCK_STD / accuracy.INIT_STD)
        else:
            sd[name] = tensor
    return loaded.config, sd


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
    parser.add_argument("--out", type=Path)
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
            ref = accuracy._log_probs(config, sd, "float32", prompts)
            p = ref.exp()
            for fmt in args.formats.split(","):
                q = accuracy._log_probs(config, sd, fmt, prompts)
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
    kernels = kernel_family("auto", ModelConfig(n_embd=64), accuracy.torch.device("cpu"))
    positions = sum(len(ids) for ids in prompts)
    report = {"kernels": kernels, "positions": positions, "prompts": len(prompts)}
    text = json.dumps(report | {"results": results, "summary": summary}, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
