"""Plot bench_engine.py's JSON: grouped bars of ms per decode step by request shape and engine/precision,
with each precision's roofline as a line; `--markdown` prints the results as Markdown tables instead.

    python benchmarks/plot_engine.py benchmarks/results/zen4/engine_gpt2.json [--out FILE.png] [--markdown]

The plot goes beside the JSON (engine_gpt2.json -> engine_gpt2.png) unless --out names another file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLORS = {  # engine -> precision -> colour (one hue per engine, darker for wider types)
    "gpt2serve": {"float32": "#08519c", "bfloat16": "#3182bd", "int8": "#9ecae1"},
    "ctranslate2": {"float32": "#a63603", "bfloat16": "#e6550d", "int8": "#fdae6b"},
    "transformers": {"float32": "#54278f", "bfloat16": "#9e9ac8", "int8": "#dadaeb"},
}
ROOF_STYLE = {"float32": "-", "bfloat16": "--", "int8": ":"}


def plot(report: dict, out: Path, stat: str = "median") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    series = list(dict.fromkeys((r["engine"], r["precision"]) for r in rows))
    value = {(r["engine"], r["precision"], r["shape"]): r[f"step_ms_{stat}"] for r in rows}
    labels = {r["shape"]: r["label"] for r in rows}
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(8, 2.6 * len(shapes)), 6.5))
    for i, (engine, precision) in enumerate(series):
        xs = [s + (i - (len(series) - 1) / 2) * width for s in range(len(shapes))]
        ys = [value.get((engine, precision, shape), 0) for shape in shapes]
        bars = ax.bar(xs, ys, width, label=f"{engine} {precision}", color=COLORS[engine][precision])
        ax.bar_label(bars, fmt="%.0f", fontsize=6, padding=1)
    for precision, ms in report["roofline_ms"].items():
        ax.axhline(
            ms,
            color="black",
            linestyle=ROOF_STYLE[precision],
            linewidth=0.9,
            label=f"roofline {precision} ({ms:.1f} ms)",
        )
    ax.set_xticks(range(len(shapes)), [labels[s].replace(", ", "\n", 1) for s in shapes], fontsize=8)
    ax.set_ylabel(f"ms per decode step ({stat})")
    cpu = report["machine"]["cpu"]
    ax.set_title(
        f"{report['model']} on {cpu}, {report['threads']} threads, read {report['read_GBps']} GB/s",
        fontsize=10,
    )
    ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    ax.grid(axis="y", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _cell(v: dict | None) -> str:
    if v is None:
        return "-"
    return f"{v['step_ms_median']:.1f}" + ("" if v["x_roofline"] is None else f" ({v['x_roofline']:.1f}x)")


def markdown(report: dict) -> str:
    """The step-time table (median ms/step, x roofline) and the speed-up table, as Markdown."""
    rows = report["results"]
    series = list(dict.fromkeys((r["engine"], r["precision"]) for r in rows))
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    cell = {(r["engine"], r["precision"], r["shape"]): r for r in rows}
    out = ["| engine | precision | " + " | ".join(shapes) + " |", "|---|---|" + "---|" * len(shapes)]
    for engine, precision in series:
        vals = [cell.get((engine, precision, s)) for s in shapes]
        text = [_cell(v) for v in vals]
        out.append(f"| {engine} | {precision} | " + " | ".join(text) + " |")
    roof = " | ".join(f"{p} {ms:.1f} ms" for p, ms in report["roofline_ms"].items())
    out += ["", f"Roofline at {report['read_GBps']} GB/s: {roof}.", ""]
    out += ["| shape | precision | gpt2serve ms | vs CTranslate2 | vs transformers (same precision) "
            "| vs transformers fp32 |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["ratios"]:
        ratios = [
            r.get(k)
            for k in ("speedup_vs_ctranslate2", "speedup_vs_transformers", "speedup_vs_transformers_fp32")
        ]
        text = [f"{x:.2f}x" if x else "-" for x in ratios]
        out.append(
            f"| {r['shape']} | {r['precision']} | {r['gpt2serve_ms']:.1f} | " + " | ".join(text) + " |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="JSON written by bench_engine.py --out")
    ap.add_argument("--out", help="the PNG (default: the JSON's path with .png)")
    ap.add_argument("--markdown", action="store_true", help="print Markdown tables, draw nothing")
    ap.add_argument("--stat", choices=("median", "min"), default="median", help="which step time to draw")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.results).read_text())))
        return
    out = Path(args.out) if args.out else Path(args.results).with_suffix(".png")
    print(plot(json.loads(Path(args.results).read_text()), out, args.stat))


if __name__ == "__main__":
    main()
