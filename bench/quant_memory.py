"""Weight memory of quantized FLUX-geometry blocks (random weights): ``python -m bench.quant_memory``.

One FLUX.1 double-stream block (``FluxTransformerBlock``, dim 3072, 24 heads x 128) and one single-stream block
(``FluxSingleTransformerBlock``) in bf16; every linear layer is quantized with ``ditkern.quant.quantize`` (what
``ditkern.patch(model, quant=...)`` does to each layer) and its packed codes + scales are counted against the bf16
weight. Biases (kept in bf16 by the quantized layer) are listed separately. Writes
bench/results/quant/memory_flux_block.{csv,md}.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

CONFIGS = [
    ("fp4_e2m1", 64, "fp32"),
    ("fp4_e2m1", 128, "bf16"),
    ("fp4_e2m1", 32, "e8m0"),
    ("int4", 64, "fp32"),
    ("fp6_e2m3", 64, "fp32"),
    ("fp6_e3m2", 64, "fp32"),
    ("fp6_e2m3", 128, "bf16"),
]
OUT = Path(__file__).resolve().parent / "results" / "quant"


def main():
    torch.set_num_threads(1)
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    from ditkern.quant.formats import bits_per_weight, quantize

    torch.manual_seed(0)
    blocks = {
        "double": FluxTransformerBlock(dim=3072, num_attention_heads=24, attention_head_dim=128).to(torch.bfloat16),
        "single": FluxSingleTransformerBlock(dim=3072, num_attention_heads=24, attention_head_dim=128).to(
            torch.bfloat16
        ),
    }
    rows = []
    for bname, block in blocks.items():
        linears = [(p, m) for p, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
        bf16 = sum(m.weight.numel() * 2 for _, m in linears)
        bias = sum(m.bias.numel() * 2 for _, m in linears if m.bias is not None)
        params = sum(m.weight.numel() for _, m in linears)
        for fmt, g, sd in CONFIGS:
            q = sum(quantize(m.weight.detach(), fmt, g, sd).nbytes for _, m in linears)
            rows.append(dict(block=bname, linear_layers=len(linears), weights=params, format=fmt, group_size=g,
                             scale_dtype=sd, bits_per_weight=bits_per_weight(fmt, g, sd), bf16_bytes=bf16,
                             quantized_bytes=q, ratio=round(q / bf16, 4), bias_bytes_bf16=bias))  # fmt: skip
            print(rows[-1], flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "memory_flux_block.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["# Weight memory of quantized FLUX-geometry blocks (random weights, dim 3072)", "",
             "Command: `python -m bench.quant_memory` (CPU). Packed codes + scales of every linear layer vs its bf16 "
             "weight; biases stay bf16 and are listed apart. Targets (TARGETS.md): <= 0.29x (FP4), <= 0.41x (FP6).", "",
             "| block | format | group | scales | bits/weight | bf16 MiB | quantized MiB | ratio | bias MiB |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['block']} | {r['format']} | {r['group_size']} | {r['scale_dtype']} | "
                     f"{r['bits_per_weight']:.3f} | "
                     f"{r['bf16_bytes'] / 2**20:.1f} | {r['quantized_bytes'] / 2**20:.1f} | {r['ratio']:.4f}x | "
                     f"{r['bias_bytes_bf16'] / 2**20:.3f} |")  # fmt: skip
    (OUT / "memory_flux_block.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
