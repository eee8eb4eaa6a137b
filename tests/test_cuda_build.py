"""Every CUDA kernel compiles for the GPUs ditkern targets (sm_80, sm_89, sm_90a, sm_100a) with the extension's own
flags, without spills and within the register file; the extension records what it was built for and refuses a GPU
it has no image for (issue 11). Runs on CPU; the compile part needs nvcc."""

import resource
import time
from pathlib import Path

import pytest
import torch

from bench import static_cuda
from ditkern import _ext

build_flags = static_cuda.build_flags
ARCHS = ("80", "89", "90a", "100a")
NO_NVCC = static_cuda.nvcc_missing()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    if NO_NVCC:
        pytest.skip(NO_NVCC)
    t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    results = static_cuda.compile_all(ARCHS, jobs=2, out_dir=tmp_path_factory.mktemp("cubin"))
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    slowest = max(results, key=lambda r: r["seconds"])
    print(
        f"\ncompiled {len(results)} (source, arch) pairs in {time.perf_counter() - t0:.1f} s wall, {cpu:.1f} s CPU; "
        f"slowest {slowest['source']} sm_{slowest['arch']} {slowest['seconds']:.1f} s"
    )
    return results, static_cuda.rows_from(results)


@pytest.mark.slow
def test_every_source_compiles_for_every_arch(compiled):
    results, _ = compiled
    assert len(results) == len(static_cuda.sources()) * len(ARCHS)
    failed = static_cuda.failures(results)
    assert not failed, "\n".join(failed)
    errors = [
        f"{r['source']} sm_{r['arch']}: {line}"
        for r in results
        for line in r["log"].splitlines()
        if "error" in line.lower()
    ]
    assert not errors, "\n".join(errors)


@pytest.mark.slow
def test_rows_for_every_kernel_and_arch(compiled):
    results, rows = compiled
    assert set(static_cuda.KEYS) <= set(rows[0])
    for source in {r["source"] for r in results}:
        per_arch = {a: {r["kernel"] for r in rows if r["source"] == source and r["arch"] == a} for a in ARCHS}
        assert all(per_arch.values()), f"{source}: no kernel rows for {[a for a, k in per_arch.items() if not k]}"
        assert len({frozenset(k) for k in per_arch.values()}) == 1, f"{source}: kernels differ between archs"
    for row in rows:
        assert row["registers"] is not None, row
        assert "(" not in row["kernel"] and "::" not in row["kernel"].split("<")[0], row["kernel"]
    if build_flags.find_tool("cuobjdump"):
        assert all(r["sass_instructions"] and r["cmem"] for r in rows)
        # the 16-byte vector paths (load_vec in common.cuh) must survive as LDG.E.128 on every target
        adaln = [r for r in rows if r["kernel"].startswith("adaln_modulate_kernel")]
        assert adaln and all(r["ldg_128"] > 0 for r in adaln)


@pytest.mark.slow
def test_no_spills_and_registers_fit(compiled):
    _, rows = compiled
    spilled = [build_flags.summary_lines([r])[0] for r in rows if build_flags.spills(r)]
    assert not spilled, "spills:\n" + "\n".join(spilled)
    over = [f"{r['kernel']} sm_{r['arch']}: {r['registers']}" for r in rows if r["registers"] > 255]
    assert not over, over


def test_parse_ptxas_reads_spills_smem_and_arch():
    text = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90a'
ptxas info    : Function properties for _Z6helperv
    8 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Function properties for _Z1kPf
    24 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4096 bytes smem
ptxas info    : Compiling entry function '_Z1kPf' for 'sm_80'
ptxas info    : Function properties for _Z1kPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, 380 bytes cmem[0]
"""
    a, b = build_flags.parse_ptxas(text, "csrc/k.cu")
    got = (a["arch"], a["registers"], a["stack_bytes"], a["spill_store_bytes"], a["spill_load_bytes"])
    assert got == ("90a", 255, 24, 12, 16)
    assert (a["shared_bytes"], a["cmem"], a["barriers"], a["source"]) == (4096, None, 1, "csrc/k.cu")
    assert (b["arch"], b["registers"], b["shared_bytes"], b["cmem"]) == ("80", 40, 0, 380)
    assert build_flags.spills(a) and not build_flags.spills(b)
    assert "WARNING" in build_flags.summary_lines([a, b])[0]


def test_short_kernel_names():
    assert build_flags.short_name("void ditkern::(anonymous namespace)::k<float, 4>(ditkern::Args)") == "k<float, 4>"
    assert build_flags.short_name("ns::probe_kernel(int*)") == "probe_kernel"


def test_default_flags_release_with_ptx():
    flags = build_flags.cuda_flags()
    assert "-g" not in flags and "-G" not in flags and "-lineinfo" not in flags
    assert {"-Xptxas", "-v", "-O3"} <= set(flags)
    assert [f for f in flags if "code=compute_" in f] == ["-gencode=arch=compute_100,code=compute_100"]
    assert [f.split("code=")[-1] for f in flags if "code=sm_" in f] == [f"sm_{a}" for a in ARCHS]
    assert "-lineinfo" in build_flags.cuda_flags(debug=True)
    assert build_flags.ptx_for(["80", "90a"]) == ["90"]  # plain PTX: arch-specific PTX does not JIT forward
    # setup.py cannot be imported without running setup(); it must take its flags from build_flags
    assert "build_flags.cuda_flags(" in (Path(__file__).parent.parent / "setup.py").read_text()


@pytest.mark.parametrize(
    "cap, archs, ptx, ok",
    [
        ((9, 0), ["80", "89", "90a", "100a"], ["100"], True),
        ((8, 6), ["80"], [], True),  # sm_80 SASS runs on 8.6
        ((8, 0), ["86"], [], False),  # ... but not the other way round
        ((12, 0), ["80", "89", "90a"], [], False),
        ((12, 0), ["80", "89", "90a", "100a"], ["100"], True),  # JIT from compute_100
        ((10, 0), ["90a"], [], False),  # 'a' SASS runs only on exactly its capability
        ((10, 3), ["100a"], [], False),
        ((10, 3), ["100f"], [], True),  # family SASS: same major, minor >=
        ((9, 0), ["80"], [], False),  # SASS does not cross majors
        ((8, 9), [], ["90"], False),  # PTX does not JIT backwards
        ((10, 0), [], ["90a"], False),  # arch-specific PTX does not JIT forward
    ],
)
def test_image_for(cap, archs, ptx, ok):
    reason = _ext.image_for(cap, archs, ptx)
    if ok:
        assert reason is None
    else:
        assert reason and str(cap) in reason and "DITKERN_CUDA_ARCH=" in reason
        assert ", ".join(f"sm_{a}" for a in archs) in reason


def test_image_reason_names_device_and_build():
    reason = _ext.image_for((12, 0), ["80", "89", "90a"], [])
    assert reason == (
        "ditkern._C has no kernel image for compute capability (12, 0) (built for sm_80, sm_89, sm_90a; no PTX): "
        'reinstall with DITKERN_CUDA_ARCH="80;89;90a;120" (pip install --no-build-isolation -e .)'
    )


class _FakeTensor:
    device = torch.device("cuda", 0)


class _FakeExt:
    def __init__(self, archs, ptx, status):
        self.archs, self.ptx, self.status, self.calls = archs, ptx, status, 0

    def build_info(self):
        return {"archs": self.archs, "ptx": self.ptx, "cuda_runtime": 13000, "lineinfo": False}

    def kernel_image_status(self, device):
        self.calls += 1
        return self.status


@pytest.fixture
def fake_gpu(monkeypatch):
    import ditkern._backend

    def install(cap, archs, ptx, status=(0, "cudaSuccess: no error", 90, 0)):
        fake = _FakeExt(archs, ptx, status)
        monkeypatch.setattr(_ext, "ext", lambda: fake)
        monkeypatch.setattr(ditkern._backend, "cuda_capability", lambda index: cap)
        _ext._image_reason.cache_clear()
        return fake

    yield install
    _ext._image_reason.cache_clear()


def test_can_run_asks_runtime_once_per_device(fake_gpu):
    fake = fake_gpu((9, 0), ["80", "90a"], ["90"])
    assert _ext.cuda_can_run_on(_FakeTensor()) is None
    assert _ext.cuda_can_run_on(_FakeTensor()) is None
    assert fake.calls == 1


def test_can_run_refuses_without_image_before_asking_runtime(fake_gpu):
    fake = fake_gpu((12, 0), ["80", "89", "90a"], [])
    reason = _ext.cuda_can_run_on(_FakeTensor())
    assert "no kernel image for compute capability (12, 0)" in reason and fake.calls == 0


def test_can_run_turns_runtime_no_image_into_reason(fake_gpu):
    message = "cudaErrorNoKernelImageForDevice: no kernel image is available for execution on the device"
    fake_gpu((9, 0), ["90a"], ["90"], status=(209, message, 0, 0))
    reason = _ext.cuda_can_run_on(_FakeTensor())
    assert "compute capability (9, 0)" in reason and message in reason and "DITKERN_CUDA_ARCH" in reason
    fake_gpu((9, 0), ["90a"], ["90"], status=(222, "cudaErrorUnsupportedPtxVersion: ...", 0, 0))
    assert "update the driver" in _ext.cuda_can_run_on(_FakeTensor())


@pytest.mark.skipif(_ext.ext_missing() is not None, reason="ditkern._C is not built")
def test_extension_records_its_build():
    info = _ext.ext().build_info()
    assert info["archs"] and info["ptx"], info
    for arch in info["archs"] + info["ptx"]:
        build_flags.arch_capability(arch)
    assert info["ptx"] == build_flags.ptx_for(info["archs"])
    assert info["cuda_runtime"] >= 12000 and isinstance(info["lineinfo"], bool)
    code, message, sass, _ptx = _ext.ext().kernel_image_status(0)
    assert isinstance(code, int) and ":" in message
    if code == 0:  # a GPU: the runtime picked an image
        assert sass > 0
