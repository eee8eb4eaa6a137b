"""``python -m ditkern info | demo | bench | compare``: the help matches the commands, the flags reach what they
name."""

import pytest

import ditkern
from ditkern.__main__ import _kv, main, parser, patch_options
from ditkern.demo import DEFAULT_SETTINGS, SETTINGS, demo_settings


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("info", "demo", "bench", "compare"):
        assert f"\n    {cmd} " in out, cmd
    flags_of = {"demo": ["--settings", "--seeds", "--steps", "--pipeline", "--out"],
                "compare": ["--pipeline", "--cache", "--quant", "--attention", "--backend"]}
    for cmd, flags in flags_of.items():
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = capsys.readouterr().out
        assert all(f in text for f in flags), (cmd, text)


def test_bench_help_is_bench_runs(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "python -m bench.run" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["bench", "e2e", "--help"])
    assert "python -m bench.e2e" in capsys.readouterr().out


def test_key_value_flags():
    assert _kv("order=2, interval=3,state_dtype=bf16") == {"order": 2, "interval": 3, "state_dtype": "bf16"}
    with pytest.raises(Exception, match="key=value"):
        _kv("order")
    args = parser().parse_args(["compare", "--cache", "order=1,interval=2", "--quant", "format=int4,group_size=32",
                                "--attention", "window=5", "--no-fused-norms"])  # fmt: skip
    opts = patch_options(args)
    assert isinstance(opts["cache"], ditkern.TaylorCache) and opts["cache"].interval == 2
    assert isinstance(opts["quant"], ditkern.QuantConfig) and opts["quant"].group_size == 32
    assert isinstance(opts["attention"], ditkern.WindowAttention) and opts["fused_norms"] is False
    assert patch_options(parser().parse_args(["compare", "--quant", "w4a8"]))["quant"] == "w4a8"


def test_demo_settings_keys():
    assert set(DEFAULT_SETTINGS) < set(SETTINGS)
    rows = demo_settings(["lossless", "all"])
    assert list(rows) == [SETTINGS["lossless"], SETTINGS["all"]]
    assert rows[SETTINGS["lossless"]] == {} and set(rows[SETTINGS["all"]]) == {"cache", "quant", "attention"}
    with pytest.raises(ValueError, match="unknown.*'fast'.*choose from lossless"):
        demo_settings(["lossless", "fast"])


def test_compare_prints_the_fidelity_table(capsys):
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is as fast and does not stall on a busy core (tests/zoo)
    try:
        assert main(["compare", "--pipeline", "digits-dit", "--seeds", "1", "--steps", "2",
                     "--cache", "order=1,interval=2",
                     "--backend", "torch"]) == 0  # the torch path: the Triton interpreter (conftest) is slow here
    finally:
        torch.set_num_threads(n)
    out = capsys.readouterr().out
    assert out.startswith("ditkern: patched ") and "Taylor cache" in out
    assert "digits-dit" in out and "PSNR dB" in out and "cache(order=1,interval=2) backend(torch)" in out
