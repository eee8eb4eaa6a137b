"""Compile Triton kernels for a real NVIDIA GPU on a machine without one (the GPU-less compile check).

Triton's interpreter (TRITON_INTERPRET=1) runs kernels on CPU tensors but enforces almost none of the compiler's rules
(constexpr globals, grid limits, shared memory, register spills). Here the real compiler runs: a stand-in CUDA driver
reports the chosen target, and every launch inside ``with target("90a") as compiled:`` compiles (``warmup=True``)
instead of running, through the project's own launchers with CPU (``torch.empty``) tensors of the real shapes, so
grids, constexprs and specialisations are the ones a GPU would see. ``ditkern._backend.compile_target`` is entered too,
so the ops' ``can_run`` checks see the target's compute capability and shared memory (a backend that cannot serve an
architecture refuses there, with its reason, and is then not compiled).

    from bench import aot
    with aot.target("90a") as compiled:
        ditkern.ops.adaln_modulate(torch.empty(1, 4608, 3072, dtype=torch.bfloat16), shift, scale, backend="triton")
    for k in compiled:
        print(k.summary())   # registers, spills, shared memory, tensor-core instructions, loops, grid check

Derived from ../shared/tools/triton_aot.py and extended: per-architecture limits (grid, shared memory), JIT caches
cleared when the architecture changes (the stand-in driver reports device 0 for every target, so without that a second
target in one process silently reuses the first one's binaries), SASS-level counts (HGMMA/QGMMA/HMMA/tcgen05, LDGSTS,
TMA, vector widths), the instructions of each SASS loop (the main loop's count per iteration), and the violations the
compile test fails on. Nothing executes: results and timings are not checked here.
Import this module before ``import triton`` happens with TRITON_INTERPRET=1 in the same process: it unsets it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import shutil
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton's own default, set so 3.9 does not warn per kernel

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.driver import CudaDriver  # noqa: E402
from triton.runtime import jit as _jit  # noqa: E402
from triton.runtime.driver import driver as _driver  # noqa: E402

from ditkern import _backend  # noqa: E402

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
GRID_LIMITS = (2**31 - 1, 65535, 65535)
ARCHS = ("80", "89", "90a", "100a")


def capability(arch: str) -> tuple[int, int]:
    """``"90a"`` -> ``(9, 0)``; ``"89"`` -> ``(8, 9)``; ``"100a"`` -> ``(10, 0)``."""
    n = int(str(arch).rstrip("a"))
    return (n // 10, n % 10)


def shared_limit(arch: str) -> int:
    with _backend.compile_target(capability(arch)):
        return _backend.max_shared_memory("cpu")


# per-SM limits and the SM count of each architecture's reference GPU (A100, L40S, H100/H200 SXM, B200): CUDA
# programming guide, compute capability tables; datasheets for the SM counts
_SM = {
    "80": dict(smem=164 * 1024, threads=2048, blocks=32, sms=108),
    "89": dict(smem=100 * 1024, threads=1536, blocks=24, sms=142),
    "90a": dict(smem=228 * 1024, threads=2048, blocks=32, sms=132),
    "100a": dict(smem=228 * 1024, threads=2048, blocks=32, sms=148),
}


def occupancy(row: dict) -> tuple[int | None, float | None]:
    """Programs resident per SM (registers: 256-register units per warp out of 64K; shared memory: the block's plus
    1 KB reserved per block; threads; blocks) and the grid's waves over the reference GPU's SMs."""
    sm = _SM.get(str(row["arch"]))
    if sm is None or row.get("registers") is None:
        return None, None
    warps = row["num_warps"]
    per_warp = -(-row["registers"] * 32 // 256) * 256
    limits = [65536 // (per_warp * warps), sm["threads"] // (32 * warps), sm["blocks"]]
    if row["shared_bytes"]:
        limits.append(sm["smem"] // (row["shared_bytes"] + 1024))
    blocks = max(0, min(limits))
    programs = math.prod(row["grid"])
    return blocks, (round(programs / (blocks * sm["sms"]), 2) if blocks else None)


class _StandInDriver(CudaDriver):
    arch = 90

    def __init__(self):  # no libcuda here: nothing to load
        pass

    @classmethod
    def is_active(cls):
        return True

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch  # noqa: PLC0415

        return torch.device("cpu")


def _tool(name: str) -> str:
    path = os.path.join(_BIN, name)
    return path if os.path.exists(path) else (shutil.which(name) or name)


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRA = re.compile(r"\bBRA\b.*?`?\(?(\.L_x_\d+)\)?")
# instruction counts in SASS (what the hardware runs) and in PTX (what Triton asked for)
_SASS_COUNTS = {
    "hgmma": r"\bHGMMA\b",  # bf16/fp16 wgmma (Hopper)
    "qgmma": r"\bQGMMA\b",  # fp8 wgmma (Hopper)
    "hmma": r"\bHMMA\b",  # mma.sync (Ampere/Ada; small tiles on Hopper)
    "qmma": r"\bQMMA\b",  # fp8 mma.sync (Ada)
    "tcgen05_mma": r"\bUTC\w*MMA\b",  # Blackwell tensor cores
    "ldgsts": r"\bLDGSTS\b",  # cp.async
    "tma_loads": r"\bUTMALDG\b|\bUBLKCP\b",
    "ldg_128": r"\bLDG\.E\.128\b|\bLDG\.E\.\w*\.128\b",
    "ldg_64": r"\bLDG\.E\.64\b|\bLDG\.E\.\w*\.64\b",
    "ldg": r"\bLDG\b",
}
_PTX_COUNTS = {
    "wgmma": r"wgmma\.mma_async",
    "mma_sync": r"\bmma\.sync",
    "tcgen05": r"tcgen05\.mma",
    "cp_async": r"cp\.async\.(?:ca|cg)",
    "tma": r"cp\.async\.bulk\.tensor",
    "ptx_v2_loads": r"ld\.global[^;\n]*\.v2",
    "ptx_v4_loads": r"ld\.global[^;\n]*\.v4",
    "ptx_v8_loads": r"ld\.global[^;\n]*\.v8",
}
_MMA = re.compile(r"\b(HGMMA|QGMMA|IGMMA|HMMA|QMMA|IMMA|UTC\w*MMA)\b")


_DEPBAR = re.compile(r"WARPGROUP\.DEPBAR\.LE\s+gsb0\s*,\s*0x([0-9a-f]+)")
_LDGSTS_WIDTH = re.compile(r"\bLDGSTS\.E(?:\.\w+)*?\.(128|64)\b")


def main_loop_traits(body: list[str] | None) -> dict:
    """What one iteration of the main loop waits on and loads.

    ``main_loop_wgmma_wait``: the smallest N of the ``WARPGROUP.DEPBAR.LE gsb0, N`` waits in the loop (wgmma.wait_group
    N: wait until at most N wgmma groups are in flight). 0 means the iteration waits for the tensor-core work it just
    issued, so loads, dequantisation and the MMA do not overlap; >= 1 keeps one group in flight. None: no wgmma wait
    in the loop (mma.sync kernels, or no loop). ``main_loop_ldg`` counts plain global loads (synchronous: their latency
    is exposed unless other warps hide it), ``main_loop_ldgsts`` async copies (cp.async, and of them 128-bit),
    ``main_loop_tma`` TMA loads.
    """
    if body is None:
        return {"main_loop_wgmma_wait": None, "main_loop_ldg": None, "main_loop_ldgsts": None,
                "main_loop_ldgsts_128": None, "main_loop_tma": None}  # fmt: skip
    waits = [int(m.group(1), 16) for b in body for m in [_DEPBAR.search(b)] if m]
    return {
        "main_loop_wgmma_wait": min(waits) if waits else None,
        "main_loop_ldg": sum(1 for b in body if re.search(r"\bLDG\b", b)),
        "main_loop_ldgsts": sum(1 for b in body if re.search(r"\bLDGSTS\b", b)),
        "main_loop_ldgsts_128": sum(1 for b in body if (m := _LDGSTS_WIDTH.search(b)) and m.group(1) == "128"),
        "main_loop_tma": sum(1 for b in body if re.search(_SASS_COUNTS["tma_loads"], b)),
    }


def parse_sass(sass: str) -> dict:
    """Instruction counts and loops of ``nvdisasm -c`` output.

    A loop is a backward branch: its body is the instructions from the target label to the branch. The main loop is the
    innermost loop with the most tensor-core instructions, else the longest loop; its length is the SASS instructions
    per iteration (an upper bound where the body branches).
    """
    instrs: list[str] = []
    labels: dict[str, int] = {}
    for line in sass.splitlines():
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = _SASS_LINE.search(line)
        if m:
            instrs.append(m.group(2).strip())
    loops = []
    for i, ins in enumerate(instrs):
        m = _BRA.search(ins)
        if m and m.group(1) in labels and labels[m.group(1)] < i:  # a lone self-branch is the end-of-kernel trap
            body = instrs[labels[m.group(1)] : i + 1]
            mma = sum(1 for b in body if _MMA.search(b))
            loops.append({"instructions": len(body), "mma": mma, "body": body, "span": (labels[m.group(1)], i)})
    # In a nest the outer body contains the inner one: among the loops with the most MMAs take the shortest (the
    # innermost loop that holds them); without MMAs the longest loop. Both sides of a branch in a body are counted.
    most = max((lp["mma"] for lp in loops), default=0)
    if most:
        main = min((lp for lp in loops if lp["mma"] == most), key=lambda lp: lp["instructions"])
    else:
        main = max(loops, key=lambda lp: lp["instructions"]) if loops else None
    text = "\n".join(instrs)
    # every innermost loop holding MMAs (a kernel with several pipelined loops, e.g. unmasked then masked tiles)
    mma_loops = [lp for lp in loops if lp["mma"]]
    inner = [lp for lp in mma_loops
             if not any(o is not lp and lp["span"][0] <= o["span"][0] and o["span"][1] <= lp["span"][1]
                        for o in mma_loops)]  # fmt: skip
    return {
        "mma_loops": sorted(lp["instructions"] for lp in inner),
        "sass_instructions": len(instrs),
        "sass_loops": len(loops),
        "main_loop_instructions": main["instructions"] if main else None,
        "main_loop_mma": main["mma"] if main else None,
        **main_loop_traits(main["body"] if main else None),
        **{k: len(re.findall(p, text)) for k, p in _SASS_COUNTS.items()},
        "spill_instructions": len(re.findall(r"\b(?:STL|LDL)\b", text)),
    }


@dataclasses.dataclass
class Compiled:
    """One compiled kernel: its name, launch grid, target and the compiler's output."""

    name: str
    grid: tuple
    arch: str
    kernel: object

    @property
    def key(self) -> tuple:
        md = self.kernel.metadata
        return (self.name, self.arch, getattr(md, "hash", None) or id(self.kernel))

    def _cubin_info(self) -> tuple[str, str]:
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(self.kernel.asm["cubin"])
            path = f.name
        try:
            res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True).stdout
            sass = subprocess.run([_tool("nvdisasm"), "-c", path], capture_output=True, text=True).stdout
        finally:
            os.unlink(path)
        return res, sass

    @functools.cached_property
    def _summary(self) -> dict:
        md, ptx = self.kernel.metadata, self.kernel.asm.get("ptx", "")
        res, sass = self._cubin_info()
        m = re.search(r"REG:(\d+).*?LOCAL:(\d+)", res)
        regs, local = (int(m.group(1)), int(m.group(2))) if m else (None, None)
        grid = tuple(int(g) for g in self.grid)
        row = {
            "kernel": self.name,
            "arch": self.arch,
            "grid": grid,
            "grid_ok": all(g <= lim for g, lim in zip(grid, GRID_LIMITS)),
            "num_warps": md.num_warps,
            "num_stages": md.num_stages,
            "shared_bytes": md.shared,
            "shared_limit": shared_limit(self.arch),
            "registers": regs,
            "local_bytes": local,  # > 0: registers spilled to local memory (or a local array)
            **{k: len(re.findall(p, ptx)) for k, p in _PTX_COUNTS.items()},
        }
        row.update(parse_sass(sass))
        return row

    def summary(self) -> dict:
        return dict(self._summary)


def violations(row: dict, memory_bound: bool) -> list[str]:
    """What the compile test fails on: grid over the hardware limits, shared memory over the architecture's, and
    register spills in a memory-bound kernel (a compute-bound kernel's spills are reported, not failed)."""
    out = []
    if not row["grid_ok"]:
        out.append(f"grid {row['grid']} exceeds the limits {GRID_LIMITS}")
    if row["shared_limit"] is not None and row["shared_bytes"] > row["shared_limit"]:
        out.append(f"shared memory {row['shared_bytes']} B exceeds sm_{row['arch']}'s {row['shared_limit']} B")
    if memory_bound and ((row["local_bytes"] or 0) > 0 or row["spill_instructions"] > 0):
        out.append(f"memory-bound kernel spills ({row['local_bytes']} B local, {row['spill_instructions']} STL/LDL)")
    return out


@contextlib.contextmanager
def target(arch: str = "90a"):
    """Inside the block every Triton launch compiles for ``sm_<arch>`` and runs nothing; yields the list of kernels
    compiled (one entry per launch, repeated launches of one specialisation share the binary)."""
    compiled: list[Compiled] = []
    cap = capability(arch)
    _StandInDriver.arch = cap[0] * 10 + cap[1]
    previous = _driver._active  # None where no driver was ever made active (no GPU)
    _driver.set_active(_StandInDriver())
    original = _jit.JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if getattr(self, "_aot_arch", None) != arch:
            # the per-device JIT cache is keyed by device index only (0 here for every target)
            self.device_caches.clear()
            self._aot_arch = arch
        k = original(self, *args, grid=grid, warmup=True, **kwargs)
        g = grid(kwargs) if callable(grid) else grid
        g = tuple(g) + (1,) * (3 - len(tuple(g)))
        compiled.append(Compiled(getattr(self, "__name__", None) or self.fn.__name__, g, arch, k))
        return k

    _jit.JITFunction.run = run
    try:
        with _backend.compile_target(cap):
            yield compiled
    finally:
        _jit.JITFunction.run = original
        _driver._active = previous
