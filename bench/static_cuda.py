"""What the compiler makes of ditkern's CUDA kernels, per kernel and architecture, without a GPU.

Every ``csrc/**/*.cu`` is compiled to a cubin for each architecture with the flags of the extension build
(``csrc/build_flags.py``, shared with setup.py) plus ``-cubin``; ptxas' ``-v`` report and the cubin's SASS
(``cuobjdump -sass``) give one row per (kernel, architecture). tests/test_cuda_build.py asserts on these rows
(no compile error, no spill, <= 255 registers); ``python -m bench.static`` renders them.

``cuda_rows(archs=("80", "89", "90a", "100a"))`` -> list of dicts with these keys (stable: other tools read them):

=================  ==================================================================================================
kernel             short demangled name with template arguments, e.g. ``fpx_gemv_kernel<float, 4, 0>`` (the mangled
                   symbol when neither cu++filt nor c++filt exists)
mangled            the kernel's symbol
source             the .cu file, relative to the repository root (``csrc/fpx/fpx_gemv.cu``)
arch               the SASS target without ``sm_`` (``"90a"``)
registers          registers per thread (ptxas)
spill_store_bytes  bytes spilled to local memory (ptxas; 0 is the rule here)
spill_load_bytes   bytes reloaded from spills (ptxas)
shared_bytes       static shared memory per block; dynamic shared memory is set at launch and not counted
stack_bytes        stack frame per thread (ptxas)
cmem               bytes of constant bank 0 (kernel parameters + driver constants): ptxas' figure, or for sm_90 and
                   newer, where ptxas prints none, CONSTANT[0] of ``cuobjdump -res-usage``; None if neither
barriers           named barriers used (ptxas)
sass_instructions  SASS instructions of the kernel, NOP padding excluded; None without cuobjdump
vector_loads       SASS global loads of 64, 128 or 256 bits (``LDG.E.64`` / ``LDG.E.128`` / ...); None without cuobjdump
ldg_128            of those, the 128-bit ones (``LDG.E.128``, with any modifiers); None without cuobjdump
ldg_64             of those, the 64-bit ones (``LDG.E.64``); None without cuobjdump
=================  ==================================================================================================

Tools are looked up in $CUDA_HOME/bin, PATH, /usr/local/cuda/bin and Triton's bundled backends/nvidia/bin. Without
nvcc ``cuda_rows`` raises RuntimeError (``nvcc_missing()`` says so beforehand); a source that fails to compile raises
with its log. ``python -m bench.static_cuda [--arch 80,90a] [--jobs N]`` prints a markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
ARCHS = ("80", "89", "90a", "100a")
KEYS = (
    "kernel",
    "mangled",
    "source",
    "arch",
    "registers",
    "spill_store_bytes",
    "spill_load_bytes",
    "shared_bytes",
    "stack_bytes",
    "cmem",
    "barriers",
    "sass_instructions",
    "vector_loads",
    "ldg_128",
    "ldg_64",
)


def _load_build_flags():
    name = "ditkern_build_flags"  # the same module object setup.py loads, if it already did
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, CSRC / "build_flags.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


build_flags = _load_build_flags()


def nvcc_missing() -> str | None:
    return None if build_flags.find_tool("nvcc") else "nvcc not found ($CUDA_HOME/bin, PATH, /usr/local/cuda/bin)"


def sources() -> list[Path]:
    return sorted(CSRC.rglob("*.cu"))


def includes() -> list[str]:
    paths = [str(CSRC)]
    if importlib.util.find_spec("pybind11") is not None:
        import pybind11

        paths.append(pybind11.get_include())
    return paths


def compile_cubin(source: Path, arch: str, out_dir: Path, sass: bool = True) -> dict:
    """nvcc -cubin for one source and architecture, then (``sass``) cubin_stats of the result:
    {source, arch, returncode, log, cubin, seconds, cubin_stats}."""
    nvcc = build_flags.find_tool("nvcc")
    if nvcc is None:
        raise RuntimeError(nvcc_missing())
    rel = source.resolve().relative_to(ROOT).as_posix()
    cubin = out_dir / f"{rel.replace('/', '_')}.sm_{arch}.cubin"
    cmd = [
        nvcc,
        "-cubin",
        *build_flags.nvcc_flags(includes()),
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        str(source),
        "-o",
        str(cubin),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    ok = proc.returncode == 0
    return {
        "source": rel,
        "arch": arch,
        "returncode": proc.returncode,
        "log": proc.stdout + proc.stderr,
        "cubin": cubin if ok else None,
        "seconds": seconds,
        "cubin_stats": cubin_stats(cubin) if ok and sass else {},
    }


def compile_all(
    archs=ARCHS, jobs: int | None = None, out_dir: Path | None = None, srcs=None, sass: bool = True
) -> list[dict]:
    """compile_cubin for every (source, arch), ``jobs`` at a time (default: all cores); ``sass=False`` skips the
    cuobjdump pass (sass_instructions / vector_loads and sm_90+ cmem are then None)."""
    archs = build_flags.parse_archs(";".join(archs))
    out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="ditkern-cubin-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    # Largest sources first (a rough proxy for compile time), so the slowest compiles do not start last.
    tasks = [(s, a) for s in sorted(srcs or sources(), key=lambda p: -p.stat().st_size) for a in archs]
    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 2) as pool:
        return list(pool.map(lambda t: compile_cubin(t[0], t[1], out_dir, sass), tasks))


def _opcode(line: str) -> str | None:
    """The opcode of a cuobjdump -sass instruction line (``/*0040*/  @P0 LDG.E.128 R4, [R2.64] ;``), else None."""
    text = line.strip()
    if not text.startswith("/*") or "*/" not in text:
        return None
    tokens = text.split("*/", 1)[1].split()
    if tokens and tokens[0].startswith("@"):
        tokens = tokens[1:]
    return tokens[0].rstrip(";") if tokens and not tokens[0].startswith("/*") else None


def cubin_stats(cubin: Path) -> dict[str, dict]:
    """{mangled kernel: {sass_instructions, vector_loads, cmem}} from cuobjdump -sass / -res-usage; {} without
    cuobjdump."""
    tool = build_flags.find_tool("cuobjdump")
    if tool is None:
        return {}
    stats: dict[str, dict] = {}

    def kernel(name: str) -> dict:
        empty = {"sass_instructions": 0, "vector_loads": 0, "ldg_128": 0, "ldg_64": 0, "cmem": None}
        return stats.setdefault(name.strip().rstrip(":"), empty)

    sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    current = None
    for line in sass.splitlines():
        if "Function : " in line:
            current = kernel(line.split("Function : ", 1)[1])
            continue
        op = _opcode(line) if current is not None else None
        if op is None or op == "NOP":
            continue
        current["sass_instructions"] += 1
        parts = op.split(".")
        widths = {p for p in parts[1:] if p in ("64", "128", "256")}
        if parts[0] == "LDG" and widths:
            current["vector_loads"] += 1
            current["ldg_128"] += "128" in widths
            current["ldg_64"] += "64" in widths
    usage = subprocess.run([tool, "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    current = None
    for line in usage.splitlines():
        if line.strip().startswith("Function "):
            current = kernel(line.strip().removeprefix("Function "))
        elif current is not None and "CONSTANT[0]:" in line:
            current["cmem"] = int(line.split("CONSTANT[0]:", 1)[1].split()[0])
    return stats


def rows_from(results: list[dict]) -> list[dict]:
    """The rows of the module docstring, from compile_all's results (failed compiles contribute none)."""
    rows = []
    for res in results:
        if res["returncode"] != 0:
            continue
        cubin = res.get("cubin_stats", {})
        for row in build_flags.parse_ptxas(res["log"], res["source"]):
            row["mangled"] = row["kernel"]
            stats = cubin.get(row["mangled"], {})
            row["sass_instructions"] = stats.get("sass_instructions")
            for key in ("vector_loads", "ldg_128", "ldg_64"):
                row[key] = stats.get(key)
            if row["cmem"] is None:
                row["cmem"] = stats.get("cmem")
            rows.append(row)
    names = build_flags.demangle([r["mangled"] for r in rows])
    for row in rows:
        row["kernel"] = names[row["mangled"]]
    return [{k: row[k] for k in KEYS} for row in rows]


def failures(results: list[dict]) -> list[str]:
    return [f"{r['source']} sm_{r['arch']} (exit {r['returncode']}):\n{r['log']}" for r in results if r["returncode"]]


def cuda_rows(archs=ARCHS, jobs: int | None = None) -> list[dict]:
    """One dict per (kernel, arch) for every kernel in csrc/ (keys: see the module docstring)."""
    reason = nvcc_missing()
    if reason:
        raise RuntimeError(f"bench.static_cuda: {reason}")
    with tempfile.TemporaryDirectory(prefix="ditkern-cubin-") as tmp:
        results = compile_all(archs, jobs=jobs, out_dir=Path(tmp))
        failed = failures(results)
        if failed:
            raise RuntimeError("bench.static_cuda: CUDA sources failed to compile:\n" + "\n".join(failed))
        return rows_from(results)


def markdown(rows: list[dict]) -> str:
    cols = [
        ("kernel", "kernel"),
        ("arch", "arch"),
        ("registers", "regs"),
        ("spill_store_bytes", "spill st B"),
        ("spill_load_bytes", "spill ld B"),
        ("shared_bytes", "smem B"),
        ("stack_bytes", "stack B"),
        ("cmem", "cmem B"),
        ("sass_instructions", "SASS instr"),
        ("vector_loads", "vec LDG"),
    ]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for row in sorted(rows, key=lambda r: (r["source"], r["kernel"], build_flags.arch_capability(r["arch"]))):
        cells = [f"`{row[k]}`" if k == "kernel" else ("-" if row[k] is None else str(row[k])) for k, _ in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=",".join(ARCHS), help="architectures, comma separated (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel nvcc processes (default: all cores)")
    args = parser.parse_args()
    print(markdown(cuda_rows(tuple(build_flags.parse_archs(args.arch)), jobs=args.jobs)))
