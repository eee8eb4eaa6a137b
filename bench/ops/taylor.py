"""Bench cases for the Taylor cache ops (taylor_update, taylor_forecast) at the residual-stream shapes.

Baseline: the eager chain of torch ops computing the same update / forecast (what a Python TaylorSeer does), and
torch.compile of it. Minimum bytes, order 2: update reads x, base, d0, d1 and writes d0, d1, d2 (7 tensors);
forecast reads base, d0, d1, d2 and writes out (5 tensors).
"""

from __future__ import annotations

import functools

import torch

from bench.registry import Case, register
from ditkern.ops.taylor import taylor_forecast, taylor_update


def _inputs(B, S, D, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda: torch.randn(B, S, D, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return dict(
        x=mk(), base=mk(), d0=mk(), d1=mk(), d2=mk(),
        c1=torch.full((B,), 2.0, device=device), c2=torch.full((B,), 1.5, device=device),
        mask=torch.ones(B, dtype=torch.int32, device=device),
    )  # fmt: skip


def eager_update(x, base, d0, d1, d2, c1, c2):
    f = x - base
    n1 = (f - d0) * c1[:, None, None]
    d2.copy_((n1 - d1) * c2[:, None, None])
    d1.copy_(n1)
    d0.copy_(f)


def eager_forecast(base, d0, d1, d2, a1, a2):
    return base + d0 + a1[:, None, None] * d1 + a2[:, None, None] * d2


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def register_cases(shapes: dict) -> None:
    for shape, dims in shapes.items():
        B, S, D = dims["B"], dims["S"], dims["D"]
        nbytes = lambda i, k: k * i["x"].numel() * i["x"].element_size()  # noqa: E731
        upd = ("x", "base", "d0", "d1", "d2", "c1", "c2")
        fc = ("base", "d0", "d1", "d2", "c1", "c2")
        register(Case(
            op="taylor_update", shape=shape, dims=dims,
            make_inputs=functools.partial(_make, B, S, D),
            impls={
                "ditkern": lambda i: taylor_update(i["x"], i["d0"], i["d1"], i["d2"], i["c1"], i["c2"], i["mask"], base=i["base"], order=2),
                "ditkern-triton": lambda i: taylor_update(i["x"], i["d0"], i["d1"], i["d2"], i["c1"], i["c2"], i["mask"], base=i["base"], order=2, backend="triton"),
                "eager": lambda i: eager_update(*(i[k] for k in upd)),
                "compile": lambda i: _compiled(eager_update)(*(i[k] for k in upd)),
            },
            bytes_moved=lambda i: nbytes(i, 7),
        ))  # fmt: skip
        register(Case(
            op="taylor_forecast", shape=shape, dims=dims,
            make_inputs=functools.partial(_make, B, S, D),
            impls={
                "ditkern": lambda i: taylor_forecast(i["d0"], i["d1"], i["d2"], i["c1"], i["c2"], base=i["base"], order=2),
                "ditkern-triton": lambda i: taylor_forecast(i["d0"], i["d1"], i["d2"], i["c1"], i["c2"], base=i["base"], order=2, backend="triton"),
                "eager": lambda i: eager_forecast(*(i[k] for k in fc)),
                "compile": lambda i: _compiled(eager_forecast)(*(i[k] for k in fc)),
            },
            bytes_moved=lambda i: nbytes(i, 5),
        ))  # fmt: skip


def _make(B, S, D, device, dtype):
    return _inputs(B, S, D, device, dtype)
