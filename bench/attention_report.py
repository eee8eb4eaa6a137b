"""Tabulate the attention bench rows: achieved fraction of the ideal speedup over dense SDPA.

``python -m bench.attention_report bench/results/<gpu>/<date>_<sha>.json [--out bench/results/attention/gpu.md]``

For each window_attention / window_attention_tile row of ditkern: ``speedup_vs_sdpa / ideal_speedup`` with
``ideal_speedup = 1 / (1 - sparsity)`` (the target, TARGETS.md: >= 0.70 at flux_4096 with a 25%-of-side window). For
linear_attention: speedup over SDPA and over Sana's eager processor (target: > 1 over SDPA from S >= 4096).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def table(result: dict) -> str:
    env, rows = result["env"], result["rows"]
    lines = [f"# Attention kernels on {env['gpu']} ({env['date']}, git {env['git_sha']}, {env['dtype']})", ""]
    win = [r for r in rows if r["op"].startswith("window_attention") and r["impl"] == "ditkern"]
    if win:
        lines += [
            "| op | shape | window | sparsity | ideal x | ms | x vs SDPA | fraction of ideal | x vs flex |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in win:
            sp = r.get("speedup_vs_sdpa")
            frac = None if sp is None else round(sp / r["ideal_speedup"], 3)
            lines.append(
                f"| {r['op']} | {r['shape']} | {r['window']} | {r['sparsity']} | {r['ideal_speedup']} | {r['ms']} | "
                f"{sp} | {frac} | {r.get('speedup_vs_flex')} |"
            )
        lines.append("")
    lin = [r for r in rows if r["op"] == "linear_attention" and r["impl"] == "ditkern"]
    if lin:
        lines += ["| shape | S | ms | x vs SDPA | x vs Sana eager |", "|---|---|---|---|---|"]
        for r in lin:
            lines.append(f"| {r['shape']} | {r['S']} | {r['ms']} | {r.get('speedup_vs_sdpa')} | "
                         f"{r.get('speedup_vs_sana_eager')} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("result")
    p.add_argument("--out")
    a = p.parse_args(argv)
    text = table(json.loads(Path(a.result).read_text()))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
