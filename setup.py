"""Build script for ditkern.

The package is pure Python + Triton. Where nvcc is found (and DITKERN_SKIP_CUDA_BUILD is not 1), the CUDA sources in
csrc/ are compiled with ninja into the pybind11 extension ``ditkern._C``. The extension does not link against torch:
kernels receive raw device pointers, sizes, strides and a CUDA stream from the Python side, so one build works with any
torch version.

Environment variables (also listed in the README):
  DITKERN_SKIP_CUDA_BUILD=1     never build the extension
  DITKERN_CUDA_ARCH="80;89;90a" the architectures to compile for (semicolon or comma separated)
  CUDA_HOME                     where the CUDA toolkit lives (default: from the nvcc on PATH, then /usr/local/cuda)
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH = "80;89;90a"


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


def _gencode_flags(spec: str) -> list[str]:
    flags = []
    for arch in spec.replace(",", ";").split(";"):
        arch = arch.strip().replace("sm_", "").replace(".", "")
        if not arch:
            continue
        if not arch.rstrip("a").isdigit():
            raise ValueError(f"DITKERN_CUDA_ARCH: cannot parse architecture {arch!r} (expected e.g. '80;89;90a')")
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    if not flags:
        raise ValueError(f"DITKERN_CUDA_ARCH={spec!r} names no architecture")
    return flags


class NinjaCudaBuildExt(build_ext):
    """Compile csrc/**/*.cu with nvcc through a generated build.ninja, then let setuptools link the pybind11 module."""

    def build_extension(self, ext):
        nvcc = _find_nvcc()
        cuda_home = _cuda_home(nvcc)
        build_dir = Path(self.build_temp).resolve() / "cuda"
        build_dir.mkdir(parents=True, exist_ok=True)
        import pybind11

        arch = os.environ.get("DITKERN_CUDA_ARCH", DEFAULT_ARCH)
        includes = [str(ROOT / "csrc"), pybind11.get_include()]
        cu_flags = [
            "-O3",
            "-std=c++17",
            "--expt-relaxed-constexpr",
            "-Xcompiler",
            "-fPIC",
            "-lineinfo",
            *_gencode_flags(arch),
            *[f"-I{p}" for p in includes],
        ]
        sources = sorted(glob.glob(str(ROOT / "csrc" / "**" / "*.cu"), recursive=True))
        objects = []
        lines = [
            "ninja_required_version = 1.3",
            f"nvcc = {nvcc}",
            f"cuflags = {' '.join(cu_flags)}",
            "rule cuda_compile",
            "  command = $nvcc $cuflags -c $in -o $out",
            "  description = nvcc $in",
            "",
        ]
        for src in sources:
            obj = build_dir / (Path(src).relative_to(ROOT).as_posix().replace("/", "_") + ".o")
            objects.append(str(obj))
            lines.append(f"build {obj}: cuda_compile {src}")
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
        ninja = shutil.which("ninja")
        if ninja is None:
            try:
                import ninja as _ninja  # the PyPI package ships the binary

                ninja = str(Path(_ninja.BIN_DIR) / "ninja")
            except ImportError as exc:  # pragma: no cover - build-system requires ninja
                raise RuntimeError("building ditkern._C needs ninja (pip install ninja)") from exc
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        print(f"ditkern: compiling {len(sources)} CUDA source(s) for {arch} with {nvcc}", flush=True)
        try:
            subprocess.run([ninja, "-C", str(build_dir), "-j", jobs], check=True)
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(
                "ditkern: the CUDA extension failed to compile (see the nvcc output above). "
                "Set DITKERN_SKIP_CUDA_BUILD=1 to install without it (Triton and torch backends only)."
            ) from exc
        ext.extra_objects = objects
        ext.include_dirs = includes + [str(cuda_home / "include")]
        lib_dir = cuda_home / "lib64"
        if not lib_dir.exists():
            lib_dir = cuda_home / "lib"
        ext.library_dirs = [str(lib_dir)]
        # Static cudart: the module then needs only the driver (libcuda) at run time, not a matching toolkit.
        ext.libraries = ["cudart_static", "dl", "rt", "pthread"]
        super().build_extension(ext)


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
