"""Which keys a box of window-attention queries sees along one grid axis: the loop bounds of the window kernel.

Pure Python (no Triton), so that the op's host-side code (the auto tile choice, the chunked torch path) and the
kernel's host-side replay (``visited_key_fraction``) share one definition without the kernel module importing the op.
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
