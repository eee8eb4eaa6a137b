"""ditkern.ops.window_attention: the mask builder against a brute-force definition, the Triton kernel (interpreter on
CPU) and the chunked torch path against dense masked SDPA, and argument validation."""

import itertools
import math

import pytest
import torch

from ditkern.ops.window_attention import (
    make_spec,
    window_attention,
    window_attention_ref,
    window_mask,
    window_sparsity,
)

HAS_GPU = torch.cuda.is_available()
# flash-attention rule (STYLE.md): err(kernel) <= 2 * err(torch SDPA in the same dtype) + FLOOR, both against the
# float64 reference. The floor covers one rounding of outputs of magnitude ~1 in the dtype.
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _qkv(B, H, S, D, dtype, device, noncontig=False):
    if noncontig:  # the [B, S, H, D] -> [B, H, S, D] view the attention processors hand over
        return [torch.randn(B, S, H, D, device=device).to(dtype).transpose(1, 2) for _ in range(3)]
    return [torch.randn(B, H, S, D, device=device).to(dtype) for _ in range(3)]


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _check_case(backend, dtype, grid, window, T, pos, device, B=2, H=2, D=16, text_mask=None, noncontig=False, **kw):
    S = T + math.prod(grid)
    q, k, v = _qkv(B, H, S, D, dtype, device, noncontig)
    args = dict(grid=grid, window=window, text_tokens=T, text_position=pos, text_mask=text_mask, **kw)
    out = window_attention(q, k, v, backend=backend, **args)
    ref = window_attention_ref(q.double(), k.double(), v.double(), **args)
    mask = window_mask(grid, window, text_tokens=T, text_position=pos, text_mask=text_mask, device=q.device,
                       **{n: kw[n] for n in ("shape", "granularity", "tile") if n in kw})  # fmt: skip
    eager = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # torch in the same dtype
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert _err(out, ref) <= 2 * _err(eager, ref) + FLOOR[dtype], (_err(out, ref), _err(eager, ref))
    return out, ref


def _backends():
    return ["triton", "torch"]  # no CUDA window kernel (see docs/attention.md)


# ----------------------------------------------------------------------------------------------------------------------
# the mask itself, against a brute-force restatement of the definition
# ----------------------------------------------------------------------------------------------------------------------
def _brute_allowed(grid, window, shape, granularity, tile, qc, kc):
    ok = True
    for n, w, t, a, b in zip(grid, window, tile, qc, kc):
        w = min(w, n) if shape == "rect" else w
        if shape == "circle":
            continue
        if granularity == "tile":
            nt = -(-n // t)
            wt = nt if w >= n else w // t
            s = min(max(a // t - wt // 2, 0), nt - wt)
            ok &= s <= b // t < s + wt
        else:
            s = min(max(a - w // 2, 0), n - w)
            ok &= s <= b < s + w
    if shape == "circle":
        return sum(((a - b) / (w // 2)) ** 2 if w > 1 else (0 if a == b else 9) for w, a, b in zip(window, qc, kc)) <= 1
    return ok


@pytest.mark.parametrize(
    "grid,window,shape,granularity,tile",
    [
        ((5, 7), 3, "rect", "token", None),
        ((5, 7), (1, 5), "rect", "token", None),
        ((3, 4, 6), (3, 1, 5), "rect", "token", None),
        ((9, 7), 5, "circle", "token", None),
        ((10, 9), (6, 9), "rect", "tile", (2, 8)),  # 3 tiles of 2 rows; the w axis (9 >= 9) is whole
    ],
)
def test_mask_matches_brute_force_definition(grid, window, shape, granularity, tile):
    m = window_mask(grid, window, shape=shape, granularity=granularity, tile=tile)[0, 0]
    spec = make_spec(grid, window, shape=shape, granularity=granularity, tile=tile)
    coords = list(itertools.product(*[range(n) for n in grid]))
    win = window if isinstance(window, tuple) else (window,) * len(grid)
    t = tile or (1,) * len(grid)
    for i, qc in enumerate(coords):
        for j, kc in enumerate(coords):
            assert bool(m[i, j]) == bool(_brute_allowed(grid, win, shape, granularity, t, qc, kc)), (qc, kc)
    if shape == "rect" and granularity == "token":  # NATTEN clamping: every query sees exactly prod(window)
        assert (m.sum(1) == math.prod(min(w, n) for w, n in zip(spec.window, spec.grid))).all()


def test_text_rows_and_columns_are_global_and_padding_masks_keys():
    tm = torch.tensor([[True, True, False], [True, True, True]])
    m = window_mask((4, 4), 3, text_tokens=3, text_position="last", text_mask=tm)
    assert m.shape == (2, 1, 19, 19)
    assert m[1, 0, 16:].all()  # text queries see everything
    assert m[1, 0, :, 16:].all()  # every query sees every real text token
    assert not m[0, 0, :, 18].any() and m[0, 0, :, 16:18].all()  # the padded one is seen by nobody


def test_sparsity_of_flux_4096_quarter_window():
    # 256 x 256 image tokens, a 65 x 65 window (~25% of the side), 512 text tokens
    s = window_sparsity((256, 256), 65, text_tokens=512)
    kept = 65 * 65 * 65536 + 65536 * 512 + 512 * (65536 + 512)
    assert s == pytest.approx(1 - kept / (65536 + 512) ** 2)
    assert 0.9 < s < 0.95


# ----------------------------------------------------------------------------------------------------------------------
# kernels against dense masked SDPA
# ----------------------------------------------------------------------------------------------------------------------
CASES = [
    # grid, window, text tokens, text position, extra
    ((9, 11), 3, 5, "first", {}),  # odd grid, not a multiple of the 8x8 tile
    ((9, 11), 5, 5, "last", {}),
    ((6, 13), (3, 7), 0, "first", {}),  # no text, per-axis windows
    ((3, 5, 7), (3, 3, 5), 4, "first", {"tile": (2, 2, 4), "B": 1}),  # 3D grid, 3D query tiles
    ((9, 11), 5, 3, "first", {"shape": "circle"}),  # CLEAR's circular window
    ((16, 12), (12, 12), 5, "last", {"granularity": "tile", "tile": (4, 4)}),  # STA whole tiles
    ((10, 13), (12, 4), 3, "first", {"granularity": "tile", "tile": (4, 4)}),  # tiles cut by the grid edge
    ((13, 12), 11, 2, "first", {"tile": (4, 4), "B": 1, "H": 1}),  # key tiles inside every window: unmasked path
]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("grid,window,T,pos,kw", CASES, ids=lambda v: str(v).replace(" ", ""))
def test_matches_dense_masked_sdpa_fp32(backend, grid, window, T, pos, kw, device):
    _check_case(backend, torch.float32, grid, window, T, pos, device, **kw)


@pytest.mark.parametrize(
    "grid,window,T,pos,kw",
    [
        ((9, 11), 5, 5, "last", {"D": 72, "B": 1}),  # PixArt's head dim: the 64 + 16 split, 128-row q tiles
        ((5, 6, 7), (3, 5, 3), 70, "first", {"D": 40, "shape": "circle", "B": 1, "H": 1}),  # 32 + 16, text > a tile
    ],
    ids=["d72-text-last", "d40-circle-3d-long-text"],
)
def test_split_head_dims_and_odd_layouts_fp16(grid, window, T, pos, kw, device):
    kw = dict(kw)
    tm = torch.ones(kw.get("B", 2), T, dtype=torch.bool, device=device)
    tm[0, T // 2 :] = False  # padded text keys: every text tile becomes a masked list entry
    _check_case("triton", torch.float16, grid, window, T, pos, device, text_mask=tm, noncontig=True, **kw)


def _entry_keys(spec, e, T, pos, bn):
    """Sequence positions of the valid keys of one list entry (None for positions the kernel must mask)."""
    GT, GH, GW = spec.grid
    img = T if pos == "first" else 0
    if e < 0:
        return [-e - 1 + r for r in range(bn)]
    t0, h0, w0 = e // (GH * GW), (e // GW) % GH, e % GW
    out = []
    for dt, dh, dw in itertools.product(*(range(n) for n in spec.tile)):
        t, h, w = t0 + dt, h0 + dh, w0 + dw
        out.append(img + (t * GH + h) * GW + w if t < GT and h < GH and w < GW else None)
    return out


@pytest.mark.parametrize(
    "grid,window,T,pos,kw,has_mask",
    [
        ((13, 11), 5, 7, "first", {"tile": (4, 4)}, False),
        ((13, 11), 5, 7, "last", {"tile": (2, 8)}, True),
        ((3, 9, 10), (3, 5, 7), 0, "first", {"tile": (1, 4, 4)}, False),
        ((11, 9), 7, 3, "first", {"shape": "circle", "tile": (4, 4)}, False),
        ((16, 12), (12, 12), 5, "last", {"granularity": "tile", "tile": (4, 4)}, False),  # 128-row tile: 8 STA tiles
        ((10, 13), (12, 4), 3, "first", {"granularity": "tile", "tile": (4, 4)}, True),
    ],
)
def test_key_tile_lists_cover_each_window_once_and_full_tiles_need_no_mask(grid, window, T, pos, kw, has_mask):
    """The kernel's per-query-tile lists against the dense mask: every allowed key of every query appears in exactly
    one entry of its tile, and the unmasked ("full") entries hold only valid keys that every query may see."""
    from ditkern.kernels.window_ranges import key_tile_lists, query_tile

    spec = make_spec(grid, window, **kw)
    mask = window_mask(grid, window, text_tokens=T, text_position=pos, **kw)[0, 0]
    S = mask.shape[0]
    bn = math.prod(spec.tile)
    qt = query_tile(spec, 128)
    assert math.prod(qt) == 128
    buf, n_q = key_tile_lists(spec, qt, T, pos, has_mask)
    img, txt = (T, 0) if pos == "first" else (0, spec.n_image)
    GT, GH, GW = spec.grid
    tiles = []
    for t0, h0, w0 in itertools.product(*(range(0, n, q) for n, q in zip(spec.grid, qt))):
        box = [range(c, min(c + q, n)) for c, q, n in zip((t0, h0, w0), qt, spec.grid)]
        rows = [img + (t * GH + h) * GW + w for t, h, w in itertools.product(*box)]
        tiles.append((rows, txt + T))  # an image tile's run entries are its text keys
    for q0 in range(0, T, 128):
        tiles.append((list(range(txt + q0, txt + min(q0 + 128, T))), S))
    assert len(tiles) == n_q
    n_full = n_all = 0
    for i, (rows, c_hi) in enumerate(tiles):
        beg, mid, end = buf[3 * i : 3 * i + 3]
        seen = torch.zeros(len(rows), S, dtype=torch.int64)
        for j in range(beg, end):
            keys = _entry_keys(spec, buf[j], T, pos, bn)
            is_run = buf[j] < 0
            valid = [k for k in keys if k is not None and (not is_run or k < c_hi)]
            if j < mid:  # unmasked: every key valid, inside every query's window, no text padding
                assert len(valid) == bn, (i, j)
                assert all(k < S for k in valid)
                assert mask[rows][:, valid].all(), (i, j)
                assert not (has_mask and any(txt <= k < txt + T for k in valid))
            for k in valid:
                seen[:, k] += 1
        assert (seen <= 1).all()  # no key twice
        assert (seen[mask[rows]] == 1).all()  # every allowed key once
        n_full += mid - beg
        n_all += end - beg
    assert 0 < n_full < n_all  # both loops are exercised
    assert buf[-1] == 0 and len(buf) == max(buf[3 * n_q - 1], 3 * n_q) + 1  # padding entry read ahead by the kernel


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("pos", ["first", "last"])
def test_fp16_noncontiguous_padded_text_batch(backend, pos, device):
    tm = torch.ones(3, 6, dtype=torch.bool, device=device)
    tm[0, 4:] = False
    tm[2, 1:] = False
    _check_case(backend, torch.float16, (7, 10), 5, 6, pos, device, B=3, D=24, text_mask=tm, noncontig=True)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("grid,window", [((9, 11), 11), ((9, 11), 99), ((2, 3, 5), (3, 3, 5))])
def test_window_covering_grid_is_exactly_dense(backend, grid, window, device):
    T = 4
    S = T + math.prod(grid)
    q, k, v = _qkv(2, 2, S, 16, torch.float32, device)
    out = window_attention(q, k, v, grid=grid, window=window, text_tokens=T, backend=backend)
    dense = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert _err(out, dense) <= 1e-5
    assert window_sparsity(grid, window, text_tokens=T) == 0.0


@pytest.mark.parametrize("backend", _backends())
def test_tile_granularity_covering_grid_is_dense(backend, device):
    q, k, v = _qkv(1, 2, 5 + 12 * 8, 16, torch.float32, device)
    out = window_attention(q, k, v, grid=(12, 8), window=(12, 8), text_tokens=5, granularity="tile", tile=(4, 4),
                           backend=backend)  # fmt: skip
    dense = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert _err(out, dense) <= 1e-5


def test_window_actually_restricts_attention(device):
    """Changing a key outside every window of a query leaves that query's output unchanged; inside, it changes."""
    grid, T = (9, 11), 2
    q, k, v = _qkv(1, 1, T + 99, 16, torch.float32, device)
    out = window_attention(q, k, v, grid=grid, window=3, text_tokens=T, backend="triton")
    v2 = v.clone()
    v2[0, 0, T + 8 * 11 + 10] += 10.0  # bottom-right corner token
    out2 = window_attention(q, k, v2, grid=grid, window=3, text_tokens=T, backend="triton")
    changed = (out2 - out).abs().amax(-1)[0, 0]
    assert changed[T + 0] == 0  # top-left query: far away
    assert changed[T + 8 * 11 + 10] > 0 and changed[T + 7 * 11 + 9] > 0  # neighbours see it
    assert changed[0] > 0  # text queries see everything


def test_compiles_with_fullgraph():
    q, k, v = _qkv(1, 2, 3 + 20, 16, torch.float32, "cpu")

    def f(q, k, v):
        return window_attention(q, k, v, grid=(4, 5), window=3, text_tokens=3, backend="torch") * 2

    out = torch.compile(f, fullgraph=True, backend="eager")(q, k, v)
    assert torch.allclose(out, f(q, k, v))


# ----------------------------------------------------------------------------------------------------------------------
# validation: errors name the argument
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(window=0), ValueError, "window"),
        (dict(window=-3), ValueError, "window"),
        (dict(window=4), ValueError, "window.*odd"),
        (dict(window=(3, 3, 3)), ValueError, "window"),
        (dict(grid=(5, 5)), ValueError, "grid.*sequence length"),
        (dict(grid=(4,)), ValueError, "grid"),
        (dict(text_tokens=-1), ValueError, "text_tokens"),
        (dict(text_position="middle"), ValueError, "text_position"),
        (dict(shape="square"), ValueError, "shape"),
        (dict(granularity="tile", window=3, tile=(4, 4)), ValueError, "window.*odd number of tiles"),
        (dict(tile=(3, 4)), ValueError, "tile"),
        (dict(text_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, "text_mask"),
        (dict(scale=-1.0), ValueError, "scale"),
    ],
)
def test_bad_arguments_are_rejected_naming_them(kwargs, exc, match):
    q, k, v = _qkv(1, 2, 3 + 20, 16, torch.float32, "cpu")
    args = dict(grid=(4, 5), window=3, text_tokens=3) | kwargs
    with pytest.raises(exc, match=match):
        window_attention(q, k, v, **args)


def test_even_window_covering_axis_is_allowed():
    # an even window that covers its whole axis is the whole axis, not an off-centre neighbourhood
    assert make_spec((4, 5), (4, 3)).window == (1, 4, 3)


# ----------------------------------------------------------------------------------------------------------------------
# GPU (skipped without one): bf16 through the compiled kernel, a FLUX-like head size
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kw", [{}, {"shape": "circle"}, {"granularity": "tile", "window": 24, "tile": (8, 8)}])
def test_gpu_matches_reference(dtype, kw):
    args = dict(grid=(37, 45), window=13, T=77, pos="first") | {k: v for k, v in kw.items() if k == "window"}
    extra = {k: v for k, v in kw.items() if k != "window"}
    _check_case("triton", dtype, args["grid"], args["window"], args["T"], args["pos"], "cuda", B=2, H=3, D=128, **extra)


@pytest.mark.gpu
def test_gpu_3d_wan_like():
    _check_case("triton", torch.bfloat16, (5, 9, 16), (3, 5, 7), 0, "first", "cuda", B=1, H=2, D=128)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [72, 64])
def test_gpu_pixart_and_sd3_head_dims_with_padded_text(D):
    tm = torch.ones(2, 40, dtype=torch.bool, device="cuda")
    tm[1, 7:] = False
    _check_case("triton", torch.bfloat16, (32, 32), 9, 40, "last", "cuda", B=2, H=3, D=D, text_mask=tm, noncontig=True)


def test_auto_tile_is_a_64_token_tile_that_does_no_more_work_than_8x8():
    from ditkern.kernels.window_attention import visited_key_fraction
    from ditkern.ops.window_attention import auto_tile

    for grid, window in [((64, 64), (9, 9)), ((21, 45, 80), (3, 7, 11)), ((9, 11), (3, 3))]:
        t = auto_tile(grid, window)
        assert math.prod(t) == 64 and len(t) == len(grid)
        auto = make_spec(grid, window)
        fixed = make_spec(grid, window, tile=(8, 8) if len(grid) == 2 else (1, 8, 8))
        assert auto.tile[-len(t):] == t
        n_auto = math.prod(-(-n // a) for n, a in zip(auto.grid, auto.tile))
        n_fixed = math.prod(-(-n // a) for n, a in zip(fixed.grid, fixed.tile))
        # total key work = query tiles x keys visited per query tile
        assert n_auto * visited_key_fraction(auto) <= n_fixed * visited_key_fraction(fixed) + 1e-9


def test_flex_baseline_says_why_it_is_skipped_on_cpu():
    from bench.ops.window_attention import _flex_run, flex_unavailable

    reason = flex_unavailable("cpu")
    assert reason and "GPU-only" in reason
    q = torch.randn(1, 1, 4 + 16, 16)
    with pytest.raises(RuntimeError, match="flex_attention baseline skipped"):
        _flex_run({"q": q, "k": q, "v": q}, grid=(4, 4), window=3, T=4, granularity="token")
