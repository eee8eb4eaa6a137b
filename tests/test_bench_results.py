"""bench.run never overwrites an earlier result, prints what it wrote, and --tier b picks one shape per op."""

import json

from bench import registry
from bench import run as bench_run


def _quick(tmp_path, capsys):
    argv = ["--quick", "--ops", "taylor_forecast", "--impls", "eager", "--out", str(tmp_path)]
    assert bench_run.main(argv) == 0
    return capsys.readouterr().out


def test_second_run_of_the_day_gets_its_own_files_and_paths_are_printed(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DITKERN_GIT_SHA", "abc123")
    first = _quick(tmp_path, capsys)
    second = _quick(tmp_path, capsys)
    names = sorted(p.name for p in tmp_path.iterdir())
    stems = sorted({n.rsplit(".", 1)[0] for n in names})
    assert len(names) == 6 and len(stems) == 2, names
    assert stems[0].endswith("_abc123") and stems[1] == stems[0] + "_2"
    for out, stem in ((first, stems[0]), (second, stems[1])):
        wrote = [line.split("wrote ", 1)[1] for line in out.splitlines() if line.startswith("bench.run: wrote ")]
        assert sorted(wrote) == sorted(str(tmp_path / f"{stem}{ext}") for ext in (".json", ".csv", ".md"))
    env = json.loads((tmp_path / f"{stems[0]}.json").read_text())["env"]
    assert env["git_sha"] == "abc123"  # passed in from outside (the GPU machine's copy has no .git)


def test_claim_stem_skips_any_existing_suffix(tmp_path):
    env = {"date": "2026-01-02T03:04:05Z", "git_sha": "s", "gpu": "g", "torch": "t", "cuda": "c", "triton": "x",
           "dtype": "bf16", "measured_copy_GBps": 1}  # fmt: skip
    (tmp_path / "2026-01-02_s.csv").write_text("")  # an earlier run that got as far as its CSV
    assert bench_run.claim_stem(tmp_path, env) == "2026-01-02_s_2"
    assert bench_run.claim_stem(tmp_path, env) == "2026-01-02_s_3"


def test_tier_b_is_one_named_shape_per_op():
    cases = registry.load_all()
    chosen = bench_run.select_cases(cases, tier="b")
    ops = {c.op for c in cases}
    assert {c.op for c in chosen} == ops  # every op is measured
    for c in chosen:
        assert c.shape in registry.TIER_B.get(c.op, (c.shape,))
    for op, shapes in registry.TIER_B.items():  # every shape TIER_B names exists (a renamed shape would be skipped)
        if op in ops:
            assert set(shapes) <= {c.shape for c in cases if c.op == op}, op
    assert len(chosen) <= len(ops) + 2
    rest = bench_run.select_cases(cases, tier="c")
    assert {c.name for c in rest} | {c.name for c in chosen} == {c.name for c in cases}
    assert not {c.name for c in rest} & {c.name for c in chosen}
    registry.REGISTRY.clear()
