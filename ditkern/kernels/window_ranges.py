"""Which keys a box of window-attention queries sees along one grid axis: the loop bounds of the window kernel.

Pure Python (no Triton), so that the op's host-side code (the auto tile choice, the chunked torch path) and the
kernel's host side (its per-query-tile key-tile lists, ``visited_key_fraction``) share one definition without the
kernel module importing the op.
``spec`` is a ``ditkern.ops.window_attention.WindowSpec`` (read by attribute: grid, window, shape, granularity, tile).
"""

from __future__ import annotations


def key_range(spec, axis: int, lo: int, hi: int) -> tuple[int, int]:
    """The union ``[k_lo, k_hi)`` of the keys seen along ``axis`` by queries with coordinates ``lo..hi`` (inclusive)."""
    n, w = spec.grid[axis], spec.window[axis]
    if spec.shape == "circle":
        r = w // 2
        return max(lo - r, 0), min(hi + r + 1, n)
    if spec.granularity == "tile":
        ta = spec.tile[axis]
        nt = -(-n // ta)
        wt = min(-(-w // ta) if w >= n else w // ta, nt)
        s0 = min(max(lo // ta - wt // 2, 0), nt - wt)
        s1 = min(max(hi // ta - wt // 2, 0), nt - wt)
        return s0 * ta, min((s1 + wt) * ta, n)
    s0 = min(max(lo - w // 2, 0), n - w)
    s1 = min(max(hi - w // 2, 0), n - w)
    return s0, s1 + w


# ----------------------------------------------------------------------------------------------------------------------
# the per-query-tile key-tile lists the kernel iterates (FlexAttention-BlockMask style, built once per layout)
# ----------------------------------------------------------------------------------------------------------------------
def _axis_units(spec, axis: int) -> tuple[int, int, int]:
    """``(divisor, window, n_units)`` of the rect rule along ``axis`` in the units it is stated in: tokens
    (``granularity="token"``) or whole tiles (``"tile"``); a query at ``c`` sees the units
    ``[s, s + window)``, ``s = clamp(c // divisor - window // 2, 0, n_units - window)``."""
    n, w = spec.grid[axis], spec.window[axis]
    if spec.granularity == "tile":
        ta = spec.tile[axis]
        nt = -(-n // ta)
        return ta, min(nt if w >= n else w // ta, nt), nt
    return 1, w, n


def _axis_tiles(spec, axis: int, qa: int, c0: int) -> list[tuple[int, bool, int, int, bool]]:
    """The key tiles along ``axis`` that the queries ``c0 .. c0 + qa - 1`` (clipped to the grid) reach: ``(k0,
    full, dmin, dmax, in_grid)``; ``full``: every key of the tile is in every query's window along this axis (rect
    rules); ``dmin``/``dmax``: the least / largest ``|q - k|`` between the two ranges (circle rule)."""
    n, ka = spec.grid[axis], spec.tile[axis]
    c1 = min(c0 + qa, n) - 1
    lo, hi = key_range(spec, axis, c0, c1)
    div, w, nu = _axis_units(spec, axis)
    s_first = min(max(c0 // div - w // 2, 0), nu - w)
    s_last = min(max(c1 // div - w // 2, 0), nu - w)
    out = []
    for k0 in range(lo, hi, ka):
        k1 = k0 + ka - 1
        in_grid = k1 < n
        k1g = min(k1, n - 1)
        full = in_grid and k0 // div >= s_last and k1 // div < s_first + w
        dmin = max(0, k0 - c1, c0 - k1g)
        dmax = max(abs(c1 - k0), abs(k1g - c0), abs(c0 - k0), abs(c1 - k1g))
        out.append((k0, full, dmin, dmax, in_grid))
    return out


def query_tile(spec, block_m: int) -> tuple[int, int, int]:
    """The ``block_m``-token query tile: the key tile (``spec.tile``) grown by doubling, one axis at a time, the
    axis that adds the least key-tile work (query tiles x key tiles each visits; the box of a query tile is a product
    of per-axis ranges, so the total is a product of per-axis sums). Axes already covering the grid are not grown."""
    q = list(spec.tile)

    def axis_cost(a, qa):
        return sum(len(_axis_tiles(spec, a, qa, c0)) for c0 in range(0, spec.grid[a], qa))

    while q[0] * q[1] * q[2] < block_m:
        best = None
        for a in range(3):
            if q[a] >= spec.grid[a]:
                continue
            grown = q.copy()
            grown[a] *= 2
            cost = 1
            for b in range(3):
                cost *= axis_cost(b, grown[b])
            if best is None or cost < best[0]:
                best = (cost, a)
        if best is None:  # the tile already covers the grid: grow the last axis (masked rows, still correct)
            q[2] *= 2
        else:
            q[best[1]] *= 2
    return q[0], q[1], q[2]


def key_tile_lists(spec, qtile, text_tokens: int, text_position: str, has_text_mask: bool) -> tuple[list[int], int]:
    """Per query tile, the key tiles it visits: ``(buffer, n_query_tiles)``.

    ``buffer`` holds, per query tile ``i`` (image tiles in raster order, then the 1-D blocks of text queries), three
    int32 ``beg, mid, end`` at ``3 i``, and entries ``buffer[beg:end]``: ``beg:mid`` need no mask at all (every key
    valid and inside every query's window), ``mid:end`` are masked. An entry ``e >= 0`` is the image key tile whose
    first token has raster index ``e`` (a ``spec.tile``-shaped patch); ``e < 0`` is the run of ``prod(spec.tile)``
    consecutive tokens from sequence position ``-e - 1`` (text keys, and every key of a text query). Circle windows
    drop the key tiles that no query of the tile reaches (the corners of the box).
    """
    GT, GH, GW = spec.grid
    T = text_tokens
    N = GT * GH * GW
    S = T + N
    bn = spec.tile[0] * spec.tile[1] * spec.tile[2]
    img_off, txt_off = (T, 0) if text_position == "first" else (0, N)
    circle = spec.shape == "circle"
    if circle:
        r = tuple(w // 2 for w in spec.window)
        R = 1
        for ra in r:
            if ra > 0:
                R *= ra * ra
        cw = tuple((R // (ra * ra)) if ra > 0 else R + 1 for ra in r)
    axes = [
        {c0: _axis_tiles(spec, a, qtile[a], c0) for c0 in range(0, spec.grid[a], qtile[a])} for a in range(3)
    ]
    text_full, text_part = [], []
    for j0 in range(0, T, bn):
        (text_full if j0 + bn <= T and not has_text_mask else text_part).append(-(txt_off + j0) - 1)
    n_q = len(axes[0]) * len(axes[1]) * len(axes[2]) + -(-T // (qtile[0] * qtile[1] * qtile[2]))
    meta = []
    body = []
    base = 3 * n_q
    for t0, lt in axes[0].items():
        for h0, lh in axes[1].items():
            for w0, lw in axes[2].items():
                full, part = [], []
                for kt, ft, dt0, dt1, gt in lt:
                    for kh, fh, dh0, dh1, gh in lh:
                        row = (kt * GH + kh) * GW
                        for kw, fw, dw0, dw1, gw in lw:
                            if circle:
                                if dt0 * dt0 * cw[0] + dh0 * dh0 * cw[1] + dw0 * dw0 * cw[2] > R:
                                    continue  # no query of the tile reaches any key of it
                                f = gt and gh and gw and dt1 * dt1 * cw[0] + dh1 * dh1 * cw[1] + dw1 * dw1 * cw[2] <= R
                            else:
                                f = ft and fh and fw
                            (full if f else part).append(row + kw)
                beg = base + len(body)
                body += full + text_full
                mid = base + len(body)
                body += part + text_part
                meta += [beg, mid, base + len(body)]
    bm = qtile[0] * qtile[1] * qtile[2]
    for q0 in range(0, T, bm):
        full, part = [], []
        for j0 in range(0, S, bn):
            touches_text = j0 < txt_off + T and j0 + bn > txt_off
            (full if j0 + bn <= S and not (has_text_mask and touches_text) else part).append(-j0 - 1)
        beg = base + len(body)
        body += full
        mid = base + len(body)
        body += part
        meta += [beg, mid, base + len(body)]
    assert len(meta) == base
    return meta + body + [0], n_q  # one entry of padding: the kernel reads the entry after the last ahead of time
