"""bench/gpu_suite.sh without a GPU: the script parses, its dry run checks every step's command, and a run against
stand-in tools (nvidia-smi, compute-sanitizer, python) shows the bookkeeping a lent machine relies on - timeouts,
failures that do not stop the next step, SUMMARY.md, results written as steps end, at most 8 files in $OUT."""

import os
import re
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "bench" / "gpu_suite.sh"


def _bash():
    if subprocess.run(["bash", "--version"], capture_output=True).returncode != 0:
        pytest.skip("no bash")
    return "bash"


def test_scripts_parse():
    for script in (SUITE, ROOT / "bench" / "fetch_wheels.sh"):
        subprocess.run([_bash(), "-n", str(script)], check=True)


def test_dry_run_plans_every_tier_and_every_command_parses(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "GPU_SUITE_STAGE": str(tmp_path / "stage"), "OUT": str(tmp_path / "out")}
    r = subprocess.run([_bash(), str(SUITE), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    for line in ("== tier a: ends by 210 s", "== tier b: ends by 360 s", "== tier c: ends by 480 s"):
        assert line in out
    for step in ("[a] env", "[a] install", "[a] info", "[a] ops", "[a] memcheck", "[b] bench", "[c] e2e", "[c] tests", "[c] bench"):
        assert step in out, step
    assert "-m bench.run --tier b" in out and "compute-sanitizer --tool memcheck" in out
    assert re.search(r"bench tier b: \d+ cases", out) and "dry run: ok (tiers a+b end by 360 s, all by 480 s)" in out
    assert not (tmp_path / "out").exists()  # a dry run writes no results


FAKE_PY = """\
#!/usr/bin/env bash
# stands in for python3 on the GPU machine: records its calls, answers like the real tools would
echo "$*" >> "$FAKE_CALLS"
case "$1 $2" in
  "-m pytest")
    if [[ "$*" == *tests/ops/test_taylor.py* ]]; then echo "FAILED tests/ops/test_taylor.py::t - boom"; echo "1 failed, 3 passed in 0.1s"; exit 1; fi
    echo "4 passed in 0.1s" ;;
  "-m bench.run")
    out=$(sed -E 's/.*--out ([^ ]+).*/\\1/' <<<"$*"); mkdir -p "$out"
    for e in json csv md; do echo partial > "$out/2026-01-01_sha.$e"; done
    echo "| op | shape |"; echo "bench.run: wrote $out/2026-01-01_sha.md"
    [[ "$*" == *"--tier c"* ]] && sleep 60 ;;
  "-m ditkern") echo "ditkern info: fake" ;;
  "-m pip") echo "pip: fake $*" ;;
  *) : ;;
esac
exit 0
"""


def _fake_bin(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tools = {
        "python-fake": FAKE_PY,
        "nvidia-smi": '#!/usr/bin/env bash\nif [[ "$*" == *compute_cap* ]]; then echo "NVIDIA H200, 580.1, 143771 MiB, 9.0"; '
        'else echo "fake nvidia-smi"; fi\n',
        "compute-sanitizer": '#!/usr/bin/env bash\necho "========= ERROR SUMMARY: 0 errors"\n',
    }
    for name, body in tools.items():
        p = bin_dir / name
        p.write_text(textwrap.dedent(body))
        p.chmod(0o755)
    return bin_dir


def test_run_with_stand_in_tools_keeps_going_and_reports(tmp_path):
    bin_dir = _fake_bin(tmp_path)
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHON": str(bin_dir / "python-fake"),
        "FAKE_CALLS": str(tmp_path / "calls.txt"),
        "OUT": str(out),
        "GPU_SUITE_STAGE": str(tmp_path / "stage"),
        "DITKERN_GIT_SHA": "cafe123",
        # the deadlines are cumulative (16 s here): tier c's bench (sleeps 60) gets what a and b left and is cut off
        "GPU_SUITE_BUDGET_A": "8",
        "GPU_SUITE_BUDGET_B": "4",
        "GPU_SUITE_BUDGET_C": "4",
    }
    r = subprocess.run([_bash(), str(SUITE)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = (out / "SUMMARY.md").read_text()
    assert "NVIDIA H200" in summary and "cafe123" in summary
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in summary.splitlines() if line.count("|") >= 7}
    assert "FAIL" in rows[("a", "ops")] and "test_taylor: rc 1" in rows[("a", "ops")]  # one failing file ...
    assert "| ok |" in rows[("a", "memcheck")] and "| ok |" in rows[("b", "bench")]  # ... does not stop the next
    assert "TIMEOUT" in rows[("c", "bench")]
    assert re.search(r"\| a \| 1 of 5 steps not ok \| \d+ \|", summary)
    # tier b wrote straight into $OUT; tier c's partial results were copied out after its timeout
    assert sorted(p.name for p in (out / "bench").iterdir()) == [f"2026-01-01_sha.{e}" for e in ("csv", "json", "md")]
    assert (out / "bench_c.md").exists() and (out / "bench_c.json").exists()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files  # the device tool returns at most 8 files
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files)
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"logs/a_ops.log", "logs/a_test_taylor.log", "logs/b_bench.log", "logs/c_bench.log"} <= names
    assert f"-> {out}/logs.tar.gz" in r.stdout and "Wrote:" in r.stdout
    calls = (tmp_path / "calls.txt").read_text()
    n_files = len(list((ROOT / "tests" / "ops").glob("test_*.py")))
    assert calls.count("-m pytest -q -ra -p no:cacheprovider") == n_files  # one process per tests/ops file
    assert "-m pip install --no-build-isolation --no-deps -e ." in calls and "--tier b --out" in calls
