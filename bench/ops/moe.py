"""Bench cases for the MoE layer: ditkern's fused dispatch vs diffusers' HiDream loop, torch.compile and dense.

Implementations, all on the same random ``MOEFeedForwardSwiGLU`` (diffusers, eval mode):
  ditkern    ``SparseMoE.from_hidream(layer)``: route + moe_align + grouped SwiGLU GEMMs + combine (+ shared expert)
  diffusers  the layer itself: MoEGate, then ``moe_infer`` (argsort, ``bincount().cpu()``, a Python loop of per-expert
             GEMMs, ``scatter_reduce``)
  grouped_mm ``torch._grouped_mm`` (``F.grouped_mm`` on newer torch), the call diffusers' NucleusMoE-Image makes in
             ``SwiGLUExperts._run_experts_grouped_mm`` (``use_grouped_mm=True``): MoEGate, a stable argsort of the
             routed rows, x gathered in expert order, ``grouped_mm(x, gate_up [E, D, 2F], offs=cumsum(counts))``,
             SwiGLU, ``grouped_mm(h, down [E, F, D], offs)``, the routing weight, ``index_add_`` back to the tokens
             (+ the shared expert). No host sync. Its packed weights are built once in make_inputs (not timed).
             Unavailable (a torch without it, or a device its kernels do not cover): the row says why
  compile    ``torch.compile`` of the layer (graph breaks at the host sync; fullgraph is impossible)
  dense      the same FLOPs as one dense SwiGLU MLP on T*top_k rows + the gate + the shared expert (the ceiling the
             grouped GEMM should approach; TARGETS.md asks >= 70% of its TFLOP/s)
FLOPs = 2*T*D*E (gate) + 6*T*top_k*D*F (routed experts) + 6*T*D*F_shared (shared expert).
ditkern's SparseMoE holds no second copy of the experts in ``ditkern.patch`` (the layer's weights become views of the
stack); here ``from_hidream(share=True)`` without the tie keeps the layer's own weights for the diffusers baseline.

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
    moe = SparseMoE.from_hidream(layer, share=True, block_m=block_m)
    # grouped_mm's operands as Nucleus packs them: gate_up [E, D, 2F] (w1 | w3), down [E, F, D]
    gate_up = torch.cat([torch.stack([e.w1.weight for e in layer.experts]),
                         torch.stack([e.w3.weight for e in layer.experts])], dim=1).transpose(1, 2)  # fmt: skip
    down = torch.stack([e.w2.weight for e in layer.experts]).transpose(1, 2)
    return dict(x=x, layer=layer, moe=moe, x_rep=x.reshape(-1, dims["D"]).repeat_interleave(dims["K"], 0),
                gate_up=gate_up, down=down)  # fmt: skip


def _grouped_mm_fn():
    fn = getattr(torch, "_grouped_mm", None) or getattr(torch.nn.functional, "grouped_mm", None)
    if fn is None:
        raise RuntimeError(f"torch {torch.__version__} has neither torch._grouped_mm nor F.grouped_mm")
    return fn


def grouped_mm_layer(i):
    """The MoE layer on ``torch._grouped_mm`` (diffusers NucleusMoE-Image's path), same routing as HiDream's gate."""
    layer, x = i["layer"], i["x"]
    mm = _grouped_mm_fn()
    xf = x.reshape(-1, x.shape[-1])
    ids, w, _ = layer.gate(x)  # [T, K] each (MoEGate, eval: softmax top-k, no renormalisation)
    K, E = ids.shape[1], i["gate_up"].shape[0]
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    tok = order // K
    offs = torch.bincount(flat, minlength=E).cumsum(0, dtype=torch.int32)
    gu = mm(xf[tok], i["gate_up"], offs=offs)
    gate, up = gu.chunk(2, dim=-1)
    y = mm(torch.nn.functional.silu(gate) * up, i["down"], offs=offs)
    y = y * w.reshape(-1)[order, None].to(y.dtype)
    out = torch.zeros_like(xf).index_add_(0, tok, y)
    return out.view(x.shape) + layer.shared_experts(x)


def moe_block_m(dims) -> int:
    """The moe_align block SparseMoE picks at this shape (block_m=None)."""
    from ditkern.ops.moe import auto_block_m  # noqa: PLC0415

    return auto_block_m(dims["T"] * dims["K"], dims["E"])


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
                    "grouped_mm": grouped_mm_layer,
                    "compile": lambda i: _compiled(i["layer"])(i["x"]),
                    "dense": dense_equal,
                },
                bytes_moved=lambda i: sum(p.numel() * p.element_size() for p in i["layer"].parameters())
                + 2 * i["x"].numel() * i["x"].element_size(),
                flops=lambda i, dims=dims: flops(dims, i["layer"]),
                baseline_names=("diffusers", "grouped_mm", "compile", "dense"),
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
    ap.add_argument("--block-m", default="auto,64,128", help="moe_align blocks to time ('auto': SparseMoE's choice)")
    ap.add_argument("--out", default="bench/results/moe")
    args = ap.parse_args(argv)
    dtype = torch.bfloat16
    gpu = torch.cuda.get_device_name()
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = []
    for shape, dims in SHAPES.items():
        blocks = [None if b == "auto" else int(b) for b in args.block_m.split(",")]
        base: dict = {}  # baselines timed once per shape (with the first block)
        for n_block, bm in enumerate(blocks):
            i = make_inputs(dims, "cuda", dtype, block_m=bm)
            fl = flops(dims, i["layer"])
            ref = i["layer"](i["x"]).float()
            err = (i["moe"](i["x"]).float() - ref).abs().max().item()
            impls = {"ditkern": lambda: i["moe"](i["x"]), "diffusers": lambda: i["layer"](i["x"]),
                     "grouped_mm": lambda: grouped_mm_layer(i), "compile": lambda: _compiled(i["layer"])(i["x"]),
                     "dense": lambda: dense_equal(i)}  # fmt: skip
            ms, notes = {}, {}
            for name, fn in impls.items():
                if n_block and name != "ditkern":
                    ms[name], notes[name] = base[name]
                    continue
                try:
                    fn()
                    ms[name], notes[name] = triton.testing.do_bench(fn, warmup=50, rep=300), ""
                except Exception as exc:  # e.g. grouped_mm on a torch / GPU without its kernels: the row says why
                    ms[name], notes[name] = None, f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                if name == "grouped_mm" and ms[name] is not None:
                    gerr = (grouped_mm_layer(i).float() - ref).abs().max().item()
                    notes[name] = f"max abs err vs diffusers {gerr:.3g}"
                base.setdefault(name, (ms[name], notes[name]))

            def ratio(a, b, scale=1.0):
                return round(scale * a / b, 2) if a is not None and b is not None else ""

            for name, t in ms.items():
                if name != "ditkern" and n_block:
                    continue
                rows.append(dict(
                    shape=shape, impl=name, block_m=(bm or moe_block_m(dims)) if name == "ditkern" else "",
                    ms=round(t, 4) if t is not None else "", tflops=round(fl / (t * 1e-3) / 1e12, 1) if t else "",
                    pct_of_dense=ratio(ms["dense"], t, 100.0), x_vs_diffusers=ratio(ms["diffusers"], t),
                    x_vs_grouped_mm=ratio(ms["grouped_mm"], t), x_vs_compile=ratio(ms["compile"], t),
                    max_abs_err_vs_diffusers=err if name == "ditkern" else "", note=notes[name], gpu=gpu, git=sha,
                    dtype="bf16",
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
