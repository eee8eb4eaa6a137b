"""Which CPU path should window_attention's torch backend use? Measures, on this CPU, fp32, one thread:

- dense SDPA with the boolean window mask (the reference),
- chunked masked SDPA (ditkern's torch backend: each query box against only the key box its windows reach),
- flex_attention with the same block mask, eager and ``torch.compile``d (compile time excluded; reported apart).

``python -m bench.attention_cpu_fallback [--out bench/results/attention/cpu_fallback.md]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import platform
import statistics
import time
from pathlib import Path

import torch

from bench.ops.window_attention import _flex_block_mask, dense_mask_sdpa
from ditkern.ops.window_attention import make_spec, window_attention_chunked, window_sparsity

CASES = [
    # grid, text, heads, head dim, window
    ((32, 32), 64, 4, 64, 9),
    ((48, 48), 128, 4, 64, 13),
    ((64, 64), 128, 2, 64, 17),
    ((4, 16, 24), 0, 4, 64, (3, 5, 7)),
]


def _time(fn, reps=5):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results/attention/cpu_fallback.md")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from torch.nn.attention.flex_attention import flex_attention  # noqa: PLC0415

    flex_c = torch.compile(flex_attention, dynamic=False)
    rows = []
    for grid, T, H, D, window in CASES:
        S = T + math.prod(grid)
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, H, S, D, generator=g) for _ in range(3))
        i = dict(q=q, k=k, v=v)
        spec = make_spec(grid, window)
        bm = _flex_block_mask(grid, window, T, "token", None, "cpu")
        ref = dense_mask_sdpa(i, grid, window, T)
        res = {}
        res["dense masked SDPA"] = (_time(lambda: dense_mask_sdpa(i, grid, window, T)), 0.0)
        out = window_attention_chunked(q, k, v, spec, T, "first", None, 1 / math.sqrt(D))
        res["chunked masked SDPA (ditkern torch)"] = (
            _time(lambda: window_attention_chunked(q, k, v, spec, T, "first", None, 1 / math.sqrt(D))),
            (out - ref).abs().max().item(),
        )
        try:
            out = flex_attention(q, k, v, block_mask=bm)
            res["flex_attention eager"] = (_time(lambda: flex_attention(q, k, v, block_mask=bm), reps=2),
                                           (out - ref).abs().max().item())  # fmt: skip
        except Exception as exc:  # reported, not fatal: this is a measurement of what works
            res["flex_attention eager"] = (None, f"{type(exc).__name__}: {str(exc)[:80]}")
        try:
            t0 = time.perf_counter()
            out = flex_c(q, k, v, block_mask=bm)
            compile_s = time.perf_counter() - t0
            res[f"flex_attention compiled (first call {compile_s:.0f} s)"] = (
                _time(lambda: flex_c(q, k, v, block_mask=bm)), (out - ref).abs().max().item())  # fmt: skip
        except Exception as exc:
            res["flex_attention compiled"] = (None, f"{type(exc).__name__}: {str(exc)[:80]}")
        sp = window_sparsity(grid, window, text_tokens=T)
        for name, (ms, err) in res.items():
            rows.append((f"{'x'.join(map(str, grid))}+{T}", H, D, str(window), f"{sp:.3f}", name, ms, err))
        print(rows[-len(res):], flush=True)
    lines = [
        "# window_attention CPU path: dense masked SDPA vs chunked masked SDPA vs flex_attention",
        "",
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d} · CPU {platform.processor() or platform.machine()} · "
        f"{a.threads} thread(s) · torch {torch.__version__} · fp32 · median of 5 (flex eager: 2) · "
        "`python -m bench.attention_cpu_fallback`",
        "",
        "| tokens (grid+text) | heads | Dh | window | sparsity | path | ms | max abs err vs dense masked SDPA |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = "failed" if r[6] is None else f"{r[6]:.1f}"
        err = r[7] if isinstance(r[7], str) else f"{r[7]:.1e}"
        lines.append("| " + " | ".join(map(str, r[:6])) + f" | {ms} | {err} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
