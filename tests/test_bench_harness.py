"""The benchmark harness runs end to end on the CPU (interpreter-sized shapes) and writes well-formed results."""

import csv
import json

from bench import run as bench_run


def test_quick_suite_writes_json_csv_markdown(tmp_path):
    result = bench_run.run(quick=True, out=tmp_path, impls={"ditkern", "eager"}, progress=False)
    rows = result["rows"]
    ops = {r["op"] for r in rows}
    assert {"adaln_modulate", "gated_residual_adaln", "taylor_update", "taylor_forecast"} <= ops
    for r in rows:
        assert r["ms"] is not None and r["ms"] > 0, r
        assert r["GBps"] > 0 and r["pct_peak_bw"] > 0
    eager = [r for r in rows if r["impl"] == "eager"]
    assert all(r["speedup_vs_eager"] == 1.0 for r in eager)
    env = result["env"]
    for key in ("date", "git_sha", "gpu", "torch", "triton", "measured_copy_GBps"):
        assert env[key], key
    files = {p.suffix: p for p in tmp_path.iterdir()}
    assert set(files) == {".json", ".csv", ".md"}
    assert json.loads(files[".json"].read_text())["rows"] == rows
    with open(files[".csv"]) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    md = files[".md"].read_text()
    assert "| op | shape | impl | ms |" in md and "flux_1024" in md and "x vs eager" in md
