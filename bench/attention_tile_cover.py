"""How close is the kernel's 2D/3D tiling to the ideal? Host-side replay of the Triton kernel's loop bounds (no
timing): per bench shape and window, the keys a query tile loads per query (``visited``) against the window's own
size, and the speedup bound over dense that this tiling allows (dense keys / visited keys, text included).

``python -m bench.attention_tile_cover [--out bench/results/attention/tile_cover.md]``
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from bench.ops.window_attention import ATTN_SHAPES, FRACTIONS, window_for
from ditkern.kernels.window_attention import visited_key_fraction
from ditkern.ops.window_attention import make_spec, window_sparsity


def rows():
    for name, (grid, T, H, D) in ATTN_SHAPES.items():
        for wname, frac in FRACTIONS.items():
            for gran in ("token", "tile"):
                window = window_for(grid, frac, gran)
                spec = make_spec(grid, window, granularity=gran)
                sp = window_sparsity(grid, window, text_tokens=T, granularity=gran)
                visited = visited_key_fraction(spec)
                N = math.prod(grid)
                S = N + T
                win_keys = math.prod(spec.window)
                # loaded keys per image query: visited tile cover of the window + all text keys; text queries: all
                loaded = N * (visited * win_keys + T) + T * S
                yield dict(shape=name, window=f"{wname} {'x'.join(map(str, window))}", granularity=gran,
                           sparsity=round(sp, 4), ideal=round(1 / (1 - sp), 2), visited=round(visited, 3),
                           tile_bound=round(S * S / loaded, 2))  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results/attention/tile_cover.md")
    a = p.parse_args(argv)
    lines = [
        "# Window attention: tile cover of the Triton kernel (host replay of its loop bounds, token granularity: the auto-chosen 64-token tile; tile granularity: 8x8 / 1x8x8)",
        "",
        "`visited`: keys loaded per image query / keys in its window (1.0 = no waste). `ideal`: 1 / (1 - sparsity). "
        "`tile bound`: dense keys / loaded keys, the speedup over dense this tiling allows if every loaded tile ran "
        "at dense speed. `python -m bench.attention_tile_cover`",
        "",
        "| shape | window | granularity | sparsity | ideal x | visited | tile bound x |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows():
        lines.append(f"| {r['shape']} | {r['window']} | {r['granularity']} | {r['sparsity']} | {r['ideal']} | "
                     f"{r['visited']} | {r['tile_bound']} |")  # fmt: skip
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
