"""Bench cases for the MoE layer: ditkern's fused dispatch vs diffusers' HiDream loop, torch.compile and dense.

Implementations, all on the same random ``MOEFeedForwardSwiGLU`` (diffusers, eval mode):
  ditkern    ``SparseMoE.from_hidream(layer)``: route + moe_align + grouped SwiGLU GEMMs + combine (+ shared expert)
  diffusers  the layer itself: MoEGate, then ``moe_infer`` (argsort, ``bincount().cpu()``, a Python loop of per-expert
             GEMMs, ``scatter_reduce``)
  compile    ``torch.compile`` of the layer (graph breaks at the host sync; fullgraph is impossible)
  dense      the same FLOPs as one dense SwiGLU MLP on T*top_k rows + the gate + the shared expert (the ceiling the
             grouped GEMM should approach; TARGETS.md asks >= 70% of its TFLOP/s)
FLOPs = 2*T*D*E (gate) + 6*T*top_k*D*F (routed experts) + 6*T*D*F_shared (shared expert).

``python -m bench.ops.moe`` on a GPU prints and writes ms, TFLOP/s, % of dense TFLOP/s and speedups to
bench/results/moe/<gpu>.md; ``python -m bench.run --ops moe_layer`` runs the same cases in the common harness.
"""

from __future__ import annotations

import functools

import torch

from bench.registry import Case, register

# HiDream-I1-Full: dim 2560, 4 routed experts top-2 + shared; single-stream tokens = 4096 image + 384 text
# (t5 128 + llama 128 + per-block llama 128). Expert hidden 6912, shared 3584 (HiDreamImageFeedForwardSwiGLU rounding).
SHAPES = {
    "hidream_full": dict(T=4096 + 384, D=2560, hidden=4 * 2560, E=4, K=2),
    "moe64_top8": dict(T=4096, D=2048, hidden=1536, E=64, K=8),  # fine-grained: expert F=1024, shared F=512
}
QUICK_SHAPES: dict = {}  # the interpreter-sized check lives in tests/moe/test_bench_moe.py


def _layer(dims, device, dtype):
    from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU

    torch.manual_seed(0)
    layer = MOEFeedForwardSwiGLU(dims["D"], dims["hidden"], dims["E"], dims["K"]).eval()
    return layer.to(device=device, dtype=dtype).requires_grad_(False)


def make_inputs(dims, device, dtype, block_m=None):
    from ditkern.nn import SparseMoE

    layer = _layer(dims, device, dtype)
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(1, dims["T"], dims["D"], generator=g).to(device=device, dtype=dtype)
    kw = {} if block_m is None else {"block_m": block_m}
    moe = SparseMoE.from_hidream(layer, share=True, **kw)
    return dict(x=x, layer=layer, moe=moe, x_rep=x.reshape(-1, dims["D"]).repeat_interleave(dims["K"], 0))


def flops(dims, layer) -> int:
    T, D, E, K = dims["T"], dims["D"], dims["E"], dims["K"]
    F = layer.experts[0].w1.out_features
    Fs = layer.shared_experts.w1.out_features
    return 2 * T * D * E + 6 * T * K * D * F + 6 * T * D * Fs


def dense_equal(i):
    """Same FLOPs, no routing: the gate GEMM, one expert on all T*K rows, the shared expert."""
    layer, x = i["layer"], i["x"]
    return torch.nn.functional.linear(x, layer.gate.weight), layer.experts[0](i["x_rep"]), layer.shared_experts(x)


@functools.cache
def _compiled(layer):
    return torch.compile(layer, dynamic=False)


def register_cases(shapes: dict) -> None:
    for shape, dims in shapes.items():
        register(
            Case(
                op="moe_layer",
                shape=shape,
                dims=dims,
                make_inputs=functools.partial(make_inputs, dims),
                impls={
                    "ditkern": lambda i: i["moe"](i["x"]),
                    "diffusers": lambda i: i["layer"](i["x"]),
                    "compile": lambda i: _compiled(i["layer"])(i["x"]),
                    "dense": dense_equal,
                },
                bytes_moved=lambda i: sum(p.numel() * p.element_size() for p in i["layer"].parameters())
                + 2 * i["x"].numel() * i["x"].element_size(),
                flops=lambda i, dims=dims: flops(dims, i["layer"]),
                baseline_names=("diffusers", "compile", "dense"),
            )
        )


def main(argv=None):
    """GPU: ms, TFLOP/s, % of dense TFLOP/s and speedups per shape (and per block_m), written as markdown + CSV."""
    import argparse
    import csv
    import os
    import subprocess

    import triton

    ap = argparse.ArgumentParser()
    ap.add_argument("--block-m", default="64,128")
    ap.add_argument("--out", default="bench/results/moe")
    args = ap.parse_args(argv)
    dtype = torch.bfloat16
    gpu = torch.cuda.get_device_name()
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = []
    for shape, dims in SHAPES.items():
        for bm in [int(b) for b in args.block_m.split(",")]:
            i = make_inputs(dims, "cuda", dtype, block_m=bm)
            fl = flops(dims, i["layer"])
            ref = i["layer"](i["x"]).float()
            err = (i["moe"](i["x"]).float() - ref).abs().max().item()
            impls = {"ditkern": lambda: i["moe"](i["x"]), "diffusers": lambda: i["layer"](i["x"]),
                     "compile": lambda: _compiled(i["layer"])(i["x"]), "dense": lambda: dense_equal(i)}  # fmt: skip
            ms = {}
            for name, fn in impls.items():
                if bm != int(args.block_m.split(",")[0]) and name != "ditkern":
                    ms[name] = next(r for r in rows if r["shape"] == shape and r["impl"] == name)["ms"]
                    continue
                fn()
                ms[name] = triton.testing.do_bench(fn, warmup=50, rep=300)
            for name, t in ms.items():
                if name != "ditkern" and bm != int(args.block_m.split(",")[0]):
                    continue
                rows.append(dict(
                    shape=shape, impl=name, block_m=bm if name == "ditkern" else "", ms=round(t, 4),
                    tflops=round(fl / (t * 1e-3) / 1e12, 1), pct_of_dense=round(100 * ms["dense"] / t, 1),
                    x_vs_diffusers=round(ms["diffusers"] / t, 2), x_vs_compile=round(ms["compile"] / t, 2),
                    max_abs_err_vs_diffusers=err if name == "ditkern" else "", gpu=gpu, git=sha, dtype="bf16",
                ))  # fmt: skip
                print(rows[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    slug = gpu.replace("NVIDIA ", "").replace(" ", "-").lower()
    with open(os.path.join(args.out, f"bench_{slug}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cols = list(rows[0])
    with open(os.path.join(args.out, f"bench_{slug}.md"), "w") as f:
        f.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
        for r in rows:
            f.write("| " + " | ".join(str(r[c]) for c in cols) + " |\n")


if __name__ == "__main__":
    main()
