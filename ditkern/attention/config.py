"""``ditkern.WindowAttention``: the config of ``ditkern.patch(model, attention=...)``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ditkern.ops.window_attention import GRANULARITIES, SHAPES


@dataclass(frozen=True)
class WindowAttention:
    """Swap the self-attention of selected blocks for windowed attention with global text tokens.

    window:      odd int, or one odd int per grid axis ((h, w) for images, (t, h, w) for Wan video), in tokens of
                 the transformer's grid (after patchify). With ``granularity="tile"`` an odd number of tiles.
                 A window at least as large as the grid is dense attention.
    layers:      which blocks go local: "all", a sequence of block indices (negative ones count from the end),
                 a ``slice`` (``slice(2, -2)``: all but the first and last two, the training-free hybrid), or a
                 callable ``(index, n_blocks) -> bool``. Blocks are numbered in the order the model runs them
                 (FLUX: double-stream blocks, then single-stream blocks).
    text:        "global": every image query sees every text token and text queries see everything (the only
                 mode; named so the choice is explicit where the config is written).
    shape:       "rect" (NATTEN-style clamped neighbourhood) or "circle" (CLEAR's circular window).
    granularity: "token" (a window per query) or "tile" (Sliding Tile Attention: whole tiles per query tile).
    tile:        the kernel's query/key tile (powers of two, 16-256 tokens). Token granularity: default = the
                 64-token tile with the least key-tile work for the grid and window (a speed choice only). Tile
                 granularity: default (8, 8) / (1, 8, 8), and it defines the semantics.
    grid:        the token grid, if it cannot be read from the model's inputs (FLUX's ``img_ids`` or the latent's
                 spatial shape and ``patch_size`` otherwise).
    backend:     None (``DITKERN_BACKEND`` / the patch's backend / auto), "triton" or "torch".
    """

    window: int | tuple[int, ...]
    layers: Any = "all"
    text: str = "global"
    shape: str = "rect"
    granularity: str = "token"
    tile: tuple[int, ...] | None = None
    grid: tuple[int, ...] | None = None
    backend: str | None = None

    def __post_init__(self):
        ws = (self.window,) if isinstance(self.window, int) else self.window
        try:
            ws = tuple(ws)
        except TypeError:
            raise TypeError(f"window must be an int or a tuple of ints, got {self.window!r}") from None
        if not ws or not all(isinstance(w, int) and not isinstance(w, bool) for w in ws):
            raise TypeError(f"window must be an int or a tuple of ints, got {self.window!r}")
        if any(w < 1 for w in ws):
            raise ValueError(f"window must be >= 1 on every axis, got window={self.window!r}")
        if self.granularity == "token" and any(w % 2 == 0 for w in ws):
            raise ValueError(
                f"window={self.window!r}: token-granular windows must be odd (centred on the query); "
                "use window >= the grid for dense attention"
            )
        if self.text != "global":
            raise ValueError(f"text must be 'global' (text tokens attend and are attended globally), got {self.text!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        layers = self.layers
        if not (layers == "all" or isinstance(layers, slice) or callable(layers)):
            if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) and not isinstance(layers, range):
                raise TypeError(f"layers must be 'all', a sequence of ints, a slice or a callable, got {layers!r}")
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
                raise TypeError(f"layers must hold block indices (ints), got {layers!r}")
        if self.backend is not None:
            from ditkern._backend import requested_backend  # noqa: PLC0415

            requested_backend(self.backend)

    def selected(self, n: int) -> list[int]:
        """The block indices (of ``n``) that go local."""
        layers = self.layers
        if layers == "all":
            return list(range(n))
        if isinstance(layers, slice):
            return list(range(n))[layers]
        if callable(layers) and not isinstance(layers, (Sequence, range)):
            fn: Callable[[int, int], bool] = layers
            return [i for i in range(n) if fn(i, n)]
        out = []
        for i in layers:
            if not -n <= i < n:
                raise ValueError(f"layers: block index {i} is out of range for a model with {n} attention blocks")
            out.append(i % n)
        return sorted(set(out))

    def describe(self) -> str:
        extra = "" if self.shape == "rect" else f", {self.shape}"
        extra += "" if self.granularity == "token" else f", {self.granularity}-granular"
        return f"window {self.window}{extra}, text global"
