"""The nvcc flags of ``ditkern._C`` and the parser of ptxas' ``-v`` report: one copy, read by setup.py (the build),
bench/static_cuda.py (the GPU-less compile report) and tests/test_cuda_build.py.

Standard library only, and importable by path (setup.py loads it before anything is installed).

Architectures are written as nvcc spells them without the prefix: ``80`` (sm_80), ``90a`` (sm_90a, arch-specific:
wgmma/TMA, runs only on exactly 9.0), ``100f`` (family-specific). What runs where (CUDA programming guide, "binary
compatibility"):
- SASS ``sm_XY`` runs on compute capability X.y with y >= Y (same major, same or newer minor);
- SASS ``sm_XYa`` runs only on exactly X.Y; ``sm_XYf`` on the X family, minor >= Y;
- PTX ``compute_XY`` is JIT-compiled by the driver on every capability >= X.Y. Arch-specific PTX (``compute_90a``)
  does not JIT forward, so the embedded PTX is always a plain ``compute_XY``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

DEFAULT_ARCHS = "80;89;90a;100a"

# Flags every .cu file is compiled with, for the extension and for the compile test alike. `-Xptxas -v` makes ptxas
# report registers / spills / shared memory / stack per kernel, which the build prints and the test asserts on.
# No -g / -G: device debug code (-G) disables optimisation and is never wanted in a release build.
COMMON_FLAGS = ("-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xptxas", "-v")

# -lineinfo only with DITKERN_DEBUG=1. It leaves the generated SASS unchanged (compare `cuobjdump -sass` with and
# without it) and only adds a line table, but that table embeds the absolute source paths of the build machine and
# grows the binary; a release build has no use for it. Build with DITKERN_DEBUG=1 for Nsight Compute source view and
# compute-sanitizer line numbers: it profiles the very same kernels.
DEBUG_FLAGS = ("-lineinfo",)

_ARCH_RE = re.compile(r"^(\d{2,3})([af]?)$")


def parse_archs(spec: str) -> list[str]:
    """``"80;89,sm_90a"`` -> ``["80", "89", "90a"]`` (semicolon or comma separated; ``sm_`` / ``compute_`` and dots
    dropped). Raises ValueError naming the entry it cannot read."""
    archs: list[str] = []
    for raw in spec.replace(",", ";").split(";"):
        arch = raw.strip().lower().replace("sm_", "").replace("compute_", "").replace(".", "")
        if not arch:
            continue
        if not _ARCH_RE.match(arch):
            raise ValueError(
                f"DITKERN_CUDA_ARCH: cannot parse architecture {raw.strip()!r} (expected e.g. '80;89;90a')"
            )
        if arch not in archs:
            archs.append(arch)
    if not archs:
        raise ValueError(f"DITKERN_CUDA_ARCH={spec!r} names no architecture")
    return archs


def arch_capability(arch: str) -> tuple[tuple[int, int], str]:
    """``"100a"`` -> ``((10, 0), "a")``; ``"89"`` -> ``((8, 9), "")``."""
    m = _ARCH_RE.match(arch.strip().lower().replace("sm_", "").replace("compute_", ""))
    if not m:
        raise ValueError(f"not a CUDA architecture: {arch!r}")
    number = int(m.group(1))
    return (number // 10, number % 10), m.group(2)


def ptx_for(archs: list[str]) -> list[str]:
    """The PTX to embed: the newest architecture of the list as plain ``compute_XY`` (suffix dropped), so a GPU newer
    than every SASS image (a consumer Blackwell 12.0, a future part) JIT-compiles it instead of failing."""
    newest = max(archs, key=lambda a: arch_capability(a)[0])
    cap, _ = arch_capability(newest)
    return [f"{cap[0]}{cap[1]}"]


def gencode_flags(archs: list[str], ptx: list[str]) -> list[str]:
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    flags += [f"-gencode=arch=compute_{p},code=compute_{p}" for p in ptx]
    return flags


def nvcc_flags(includes: list[str], debug: bool = False) -> list[str]:
    """Flags for one .cu file, without the -gencode list and without host-object flags (-c, -Xcompiler -fPIC)."""
    return [*COMMON_FLAGS, *(DEBUG_FLAGS if debug else ()), *[f"-I{p}" for p in includes]]


def cuda_flags(arch_spec: str = DEFAULT_ARCHS, includes: list[str] = (), debug: bool = False) -> list[str]:
    """Every nvcc flag setup.py compiles a csrc/*.cu object with, except -c / -o: the common flags, -fPIC for the
    host object, SASS for each architecture of ``arch_spec`` and PTX for the newest."""
    archs = parse_archs(arch_spec)
    return [*nvcc_flags(list(includes), debug), "-Xcompiler", "-fPIC", *gencode_flags(archs, ptx_for(archs))]


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_CMEM0 = re.compile(r"(\d+) bytes cmem\[0\]")
_BARRIERS = re.compile(r"used (\d+) barriers")


def parse_ptxas(text: str, source: str = "") -> list[dict]:
    """One dict per (kernel, arch) from the ``-Xptxas -v`` report in ``text`` (nvcc's stderr; any number of sources
    and architectures). Keys: kernel (mangled), source, arch (``"90a"``), registers, spill_store_bytes,
    spill_load_bytes, stack_bytes, shared_bytes (static shared memory; dynamic shared memory is a launch parameter),
    cmem (bytes of constant bank 0: kernel parameters; None where ptxas does not print it, as for sm_90 and newer),
    barriers."""
    rows: list[dict] = []
    entry: dict | None = None
    props_for: str | None = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            entry = {
                "kernel": m.group(1),
                "source": source,
                "arch": m.group(2).removeprefix("sm_"),
                "registers": None,
                "spill_store_bytes": 0,
                "spill_load_bytes": 0,
                "stack_bytes": 0,
                "shared_bytes": 0,
                "cmem": None,
                "barriers": 0,
            }
            rows.append(entry)
            props_for = None
            continue
        m = _PROPS.search(line)
        if m:
            props_for = m.group(1)
            continue
        m = _FRAME.search(line)
        if m and entry is not None and props_for == entry["kernel"]:
            entry["stack_bytes"], entry["spill_store_bytes"], entry["spill_load_bytes"] = map(int, m.groups())
            continue
        m = _USED.search(line)
        if m and entry is not None and entry["registers"] is None:
            entry["registers"] = int(m.group(1))
            for key, pattern in (("shared_bytes", _SMEM), ("cmem", _CMEM0), ("barriers", _BARRIERS)):
                found = pattern.search(line)
                entry[key] = int(found.group(1)) if found else entry[key]
    return rows


def spills(row: dict) -> bool:
    return row["spill_store_bytes"] > 0 or row["spill_load_bytes"] > 0


def summary_lines(rows: list[dict], names: dict[str, str] | None = None) -> list[str]:
    """One line per kernel, its architectures side by side, e.g.
    ``fpx_gemv_kernel<float, 4, 0>  regs 80:40 89:40 90a:40 100a:42  smem 256 B  stack 0 B  spill 0 B``;
    a kernel that spills on some architecture ends with a WARNING naming them."""
    names = names or {}
    kernels: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        kernels.setdefault((row["source"], names.get(row["kernel"], row["kernel"])), []).append(row)
    lines = []
    for (_source, name), group in sorted(kernels.items()):
        regs = " ".join(f"{r['arch']}:{r['registers']}" for r in group)
        smem = sorted({r["shared_bytes"] for r in group})
        stack = max(r["stack_bytes"] for r in group)
        spill = max(r["spill_store_bytes"] + r["spill_load_bytes"] for r in group)
        line = f"{name}  regs {regs}  smem {'/'.join(map(str, smem))} B  stack {stack} B  spill {spill} B"
        spilled = [
            f"sm_{r['arch']} ({r['spill_store_bytes']} B stores, {r['spill_load_bytes']} B loads)"
            for r in group
            if spills(r)
        ]
        if spilled:
            line += "  WARNING: spills registers to local memory on " + ", ".join(spilled)
        lines.append(line)
    return lines


def find_tool(name: str) -> str | None:
    """A CUDA binary (nvcc, cu++filt, cuobjdump, nvdisasm): $CUDA_HOME/bin, then PATH, then /usr/local/cuda/bin, then
    the copies Triton ships in triton/backends/nvidia/bin (found without importing triton)."""
    dirs = [Path(h, "bin") for h in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")) if h]
    found = shutil.which(name)
    if found:
        dirs.append(Path(found).parent)
    dirs.append(Path("/usr/local/cuda/bin"))
    spec = importlib.util.find_spec("triton")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        dirs.append(Path(loc, "backends", "nvidia", "bin"))
    for d in dirs:
        if (d / name).is_file() and os.access(d / name, os.X_OK):
            return str(d / name)
    return None


def short_name(demangled: str) -> str:
    """``void ditkern::(anonymous namespace)::k<float, 4>(ditkern::Args)`` -> ``k<float, 4>``: no return type, no
    namespaces, no parameter list (template arguments kept: they tell the instantiations apart)."""
    s = demangled.strip()
    if s.endswith(")"):  # drop the parameter list, matching parentheses from the end
        depth = 0
        for i in range(len(s) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(s[i], 0)
            if depth == 0:
                s = s[:i]
                break
    depth, start, cut = 0, 0, 0
    for i, ch in enumerate(s):  # the name after the last top-level "::" or space (return type) outside <...>, (...)
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth -= 1
        elif depth == 0 and ch == " ":
            start = i + 1
        elif depth == 0 and s.startswith("::", i):
            cut = i + 2
    return s[max(start, cut) :] if max(start, cut) < len(s) else s


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> short name (see short_name), through cu++filt or c++filt; names stay mangled if neither exists."""
    names = list(dict.fromkeys(names))
    tool = find_tool("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True, check=False).stdout
    lines = out.splitlines()
    if len(lines) != len(names):
        return {n: n for n in names}
    return {n: short_name(d) for n, d in zip(names, lines)}
