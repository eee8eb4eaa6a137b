"""Build script for ditkern.

The package is pure Python + Triton. Where nvcc is found (and DITKERN_SKIP_CUDA_BUILD is not 1), the CUDA sources in
csrc/ are compiled with ninja into the pybind11 extension ``ditkern._C``. The extension does not link against torch:
kernels receive raw device pointers, sizes, strides and a CUDA stream from the Python side, so one build works with any
torch version.

Every kernel is compiled to SASS for each architecture of DITKERN_CUDA_ARCH, plus PTX for the newest of them as a
plain compute_XY (csrc/build_flags.py says why and what runs where); the extension records both (``_C.build_info()``),
and ``ditkern._ext.cuda_can_run_on`` refuses a GPU neither can run on. ptxas' report (registers, spills, shared
memory, stack per kernel and architecture) is printed one line per kernel and kept as ``ptxas.json`` in the build
temp dir; spills print a warning.

Environment variables (also listed in the README):
  DITKERN_SKIP_CUDA_BUILD=1          never build the extension
  DITKERN_CUDA_ARCH="80;89;90a;100a" the SASS architectures (semicolon or comma separated); PTX: the newest of them
  DITKERN_DEBUG=1                    compile with -lineinfo (source lines in Nsight Compute / compute-sanitizer)
  CUDA_HOME                          where the CUDA toolkit lives (default: from the nvcc on PATH, then /usr/local/cuda)
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _load_build_flags():
    """csrc/build_flags.py, loaded by path: the flags and ptxas parser shared with the compile test and bench."""
    spec = importlib.util.spec_from_file_location("ditkern_build_flags", ROOT / "csrc" / "build_flags.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


build_flags = _load_build_flags()
DEFAULT_ARCH = build_flags.DEFAULT_ARCHS


def debug_build() -> bool:
    return os.environ.get("DITKERN_DEBUG", "0") == "1"


def _find_nvcc() -> str | None:
    if os.environ.get("DITKERN_SKIP_CUDA_BUILD", "0") == "1":
        return None
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and Path(home, "bin", "nvcc").exists():
        return str(Path(home, "bin", "nvcc"))
    found = shutil.which("nvcc")
    if found:
        return found
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda/bin/nvcc"
    return None


def _cuda_home(nvcc: str) -> Path:
    """The toolkit root holding include/cuda_runtime.h (nvcc on PATH may be a wrapper script elsewhere)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), str(Path(nvcc).resolve().parent.parent)]
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and Path(c, "include", "cuda_runtime.h").exists():
            return Path(c)
    raise RuntimeError(f"ditkern: found nvcc at {nvcc} but no CUDA toolkit headers; set CUDA_HOME")


class NinjaCudaBuildExt(build_ext):
    """Compile csrc/**/*.cu with nvcc through a generated build.ninja, then let setuptools link the pybind11 module."""

    def build_extension(self, ext):
        nvcc = _find_nvcc()
        cuda_home = _cuda_home(nvcc)
        build_dir = Path(self.build_temp).resolve() / "cuda"
        build_dir.mkdir(parents=True, exist_ok=True)
        import pybind11

        arch = os.environ.get("DITKERN_CUDA_ARCH", DEFAULT_ARCH)
        archs = build_flags.parse_archs(arch)
        ptx = build_flags.ptx_for(archs)
        debug = debug_build()
        includes = [str(ROOT / "csrc"), pybind11.get_include()]
        cu_flags = build_flags.cuda_flags(arch, includes, debug)
        sources = sorted(glob.glob(str(ROOT / "csrc" / "**" / "*.cu"), recursive=True))
        objects, logs = [], []
        lines = [
            "ninja_required_version = 1.7",
            f"nvcc = {nvcc}",
            f"cuflags = {' '.join(cu_flags)}",
            "rule cuda_compile",
            # ptxas -v goes to a log per object (parsed below); on failure ninja shows the log.
            "  command = $nvcc $cuflags -c $in -o $out > $out.log 2>&1 || (cat $out.log; exit 1)",
            "  description = nvcc $in",
            "",
        ]
        for src in sources:
            obj = build_dir / (Path(src).relative_to(ROOT).as_posix().replace("/", "_") + ".o")
            objects.append(str(obj))
            logs.append(Path(f"{obj}.log"))
            lines.append(f"build {obj} | {obj}.log: cuda_compile {src}")
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
        ninja = shutil.which("ninja")
        if ninja is None:
            try:
                import ninja as _ninja  # the PyPI package ships the binary

                ninja = str(Path(_ninja.BIN_DIR) / "ninja")
            except ImportError as exc:  # pragma: no cover - build-system requires ninja
                raise RuntimeError("building ditkern._C needs ninja (pip install ninja)") from exc
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        print(
            f"ditkern: compiling the CUDA extension ditkern._C: {len(sources)} CUDA source(s) for sm_"
            f"{', sm_'.join(archs)} + PTX compute_{', compute_'.join(ptx)}{' with -lineinfo' if debug else ''} with "
            f"{nvcc}, {jobs} jobs (this takes minutes; DITKERN_CUDA_ARCH=90a builds one architecture, "
            "DITKERN_SKIP_CUDA_BUILD=1 none)",
            flush=True,
        )
        try:
            subprocess.run([ninja, "-C", str(build_dir), "-j", jobs], check=True)
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(
                "ditkern: the CUDA extension failed to compile (see the nvcc output above). "
                "Set DITKERN_SKIP_CUDA_BUILD=1 to install without it (Triton and torch backends only)."
            ) from exc
        _report_ptxas(sources, logs, build_dir)
        # A stamp that changes with the configuration, so a new DITKERN_CUDA_ARCH relinks and rebuilds ditkern.cpp
        # (whose build_info() records it) even when no source changed.
        stamp = build_dir / "config.json"
        config = json.dumps({"archs": archs, "ptx": ptx, "lineinfo": debug, "flags": cu_flags})
        if not stamp.exists() or stamp.read_text() != config:
            stamp.write_text(config)
        ext.depends = [*ext.depends, *objects, str(stamp), str(ROOT / "csrc" / "build_flags.py")]
        ext.define_macros = [
            *ext.define_macros,
            ("DITKERN_ARCHS", f'"{";".join(archs)}"'),
            ("DITKERN_PTX", f'"{";".join(ptx)}"'),
            ("DITKERN_LINEINFO", "1" if debug else "0"),
        ]
        ext.extra_objects = objects
        ext.include_dirs = includes + [str(cuda_home / "include")]
        lib_dir = cuda_home / "lib64"
        if not lib_dir.exists():
            lib_dir = cuda_home / "lib"
        ext.library_dirs = [str(lib_dir)]
        # Static cudart: the module then needs only the driver (libcuda) at run time, not a matching toolkit.
        ext.libraries = ["cudart_static", "dl", "rt", "pthread"]
        super().build_extension(ext)


def _report_ptxas(sources: list[str], logs: list[Path], build_dir: Path) -> None:
    """One line per kernel and architecture from ptxas -v, a warning for each that spills; all rows -> ptxas.json."""
    rows, notes = [], []
    for src, log in zip(sources, logs):
        text = log.read_text() if log.exists() else ""
        rel = Path(src).relative_to(ROOT).as_posix()
        rows += build_flags.parse_ptxas(text, rel)
        notes += [
            f"{rel}: {line}"
            for line in text.splitlines()
            if line.strip() and "ptxas info" not in line and not line.startswith("    ")
        ]
    names = build_flags.demangle([r["kernel"] for r in rows])
    for row in rows:
        row["name"] = names[row["kernel"]]
    (build_dir / "ptxas.json").write_text(json.dumps(rows, indent=1) + "\n")
    for note in notes:  # compiler warnings of a successful build (the log hides them otherwise)
        print(f"ditkern: nvcc: {note}", flush=True)
    for line in build_flags.summary_lines(rows, names):
        print(f"ditkern: ptxas: {line}", flush=True)
    spilled = [r for r in rows if build_flags.spills(r)]
    if spilled:
        print(f"ditkern: WARNING: {len(spilled)} kernel build(s) spill registers (see above)", flush=True)
    print(f"ditkern: ptxas report of {len(rows)} kernel builds -> {build_dir / 'ptxas.json'}", flush=True)


def _extensions():
    if _find_nvcc() is None:
        print("ditkern: nvcc not found or DITKERN_SKIP_CUDA_BUILD=1: installing without the CUDA extension", flush=True)
        return [], {}
    from setuptools import Extension

    ext = Extension(
        "ditkern._C",
        sources=["csrc/ditkern.cpp"],
        language="c++",
        extra_compile_args=["-O2", "-std=c++17", "-fvisibility=hidden"],
    )
    return [ext], {"build_ext": NinjaCudaBuildExt}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

if __name__ == "__main__" and len(sys.argv) == 1:  # pragma: no cover
    print(__doc__)
