"""bench.e2e: the published configs build the published model sizes, and the harness runs every row at the scaled
CPU geometry, labelled as such, writing fresh result files."""

import json

import pytest
import torch

from bench import e2e

# Parameter counts the model cards publish (FLUX.1-dev 12B, SD3.5 Large 8.1B, Wan2.1-T2V-14B, Qwen-Image 20B).
PUBLISHED_B = {"flux": 12.0, "sd35": 8.1, "wan": 14.0, "qwen": 20.0}


@pytest.mark.parametrize("name", list(e2e.MODELS))
def test_full_configs_have_the_published_size(name):
    import diffusers

    model = e2e.MODELS[name]
    with torch.device("meta"):  # no memory: shapes only
        net = getattr(diffusers, model.cls)(**model.config)
    billions = sum(p.numel() for p in net.parameters()) / 1e9
    assert abs(billions - PUBLISHED_B[name]) / PUBLISHED_B[name] < 0.05, billions
    tokens = {"flux": 4096 + 512, "sd35": 4096 + 333, "wan": 21 * 45 * 80 + 512, "qwen": 4096 + 128}
    assert model.tokens() == tokens[name]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the scaled CPU run")
def test_scaled_run_on_cpu(tmp_path, capsys):
    # backend torch: the session's conftest sets TRITON_INTERPRET, which a user's CPU run does not have
    assert e2e.main(["--models", "flux", "--steps", "3", "--out", str(tmp_path), "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert "SCALED DOWN" in out and "no claim" in out
    paths = [line.split("wrote ", 1)[1] for line in out.splitlines() if line.startswith("bench.e2e: wrote ")]
    assert sorted(p.rsplit(".", 1)[1] for p in paths) == ["json", "md"]
    rows = {r["row"]: r for r in json.loads(open(next(p for p in paths if p.endswith(".json"))).read())["rows"]}
    assert list(rows) == list(e2e.ROWS)
    for row in ("eager", "lossless", "+cache", "+window"):
        assert rows[row]["seconds"] > 0, rows[row]
    assert rows["eager"]["speedup_vs_eager"] == 1.0
    for row in ("compile", "lossless+compile"):
        assert rows[row]["seconds"] is None and "skipped on CPU" in rows[row]["note"]
    # 3 steps, warm-up 1, interval 3: steps 0 and 1 run every block, step 2 forecasts -> 2/3 of the blocks
    assert rows["+cache"]["block_fraction"] == pytest.approx(2 / 3, abs=1e-3)
    assert rows["+all"]["seconds"] is not None or rows["+all"]["note"]
    assert "cache" in rows["+all"]["label"] and "window" in rows["+all"]["label"]
    assert all(r["seconds"] is not None or r["note"] for r in rows.values())  # no number says why
    e2e.main(["--models", "flux", "--steps", "1", "--rows", "eager", "--out", str(tmp_path)])
    assert len(list(tmp_path.glob("e2e_*.json"))) == 2  # a second run writes new files


def test_rows_are_reported_as_they_finish():
    seen = []
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as run() does on the CPU: tiny tensors, threads only stall on a busy core
    try:
        rows = e2e.run_model(e2e.scaled(e2e.MODELS["qwen"]), steps=1, rows=("eager", "lossless"), backend="torch",
                             progress=False, on_row=lambda so_far: seen.append([r["row"] for r in so_far]))
    finally:
        torch.set_num_threads(n)
    assert seen == [["eager"], ["eager", "lossless"]]
    assert rows[1]["speedup_vs_eager"] == pytest.approx(rows[0]["seconds"] / rows[1]["seconds"], rel=1e-2)
