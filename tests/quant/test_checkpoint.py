"""Quantized checkpoints as directories (diffusers layout, shards) or .safetensors files: load by path, by class,
into an instance or a pipeline, with no full-precision weights; outputs equal to the in-memory quantized model; clear
errors for missing or wrong paths. (Single-file round trips and the ditkern-quant-1 file: tests/quant/test_patch.py.)"""

import json
import os

import pytest
import torch

import ditkern
from ditkern.quant import checkpoint as ck
from ditkern.quant.feature import quantized_layers
from tests.patch import tiny


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny DiT quantized to FP4 (weight-only), its output, and a sharded directory checkpoint of it."""
    torch.manual_seed(0)
    model, inputs = tiny.dit()
    model.eval()
    ditkern.patch(model, quant="fp4", backend="torch")
    out = _run(model, inputs)
    d = str(tmp_path_factory.mktemp("ckpt") / "dit-fp4")  # does not exist yet: created
    ditkern.save_quantized(model, d, max_shard_size=20_000)
    return model, inputs, out, d


def test_directory_layout_and_shards(saved):
    model, _, _, d = saved
    files = sorted(os.listdir(d))
    shards = [f for f in files if f.startswith("diffusion_pytorch_model-") and f.endswith(".safetensors")]
    assert "config.json" in files and ck.QUANT_CONFIG_NAME in files and ck.INDEX_NAME in files and len(shards) > 1
    with open(os.path.join(d, "config.json")) as f:
        assert json.load(f)["_class_name"] == "DiTTransformer2DModel"
    with open(os.path.join(d, ck.INDEX_NAME)) as f:
        assert sorted(set(json.load(f)["weight_map"].values())) == shards
    q = ck.read_metadata(d)
    assert q["checkpoint_format"] == ck.CHECKPOINT_FORMAT and q["formats"] == ["fp4_e2m1"]
    assert set(q["layers"]) == set(quantized_layers(model)) and q["skipped"]
    ditkern.save_quantized(model, d)  # saved again unsharded: the old shards and index are gone
    assert sorted(os.listdir(d)) == sorted(["config.json", ck.QUANT_CONFIG_NAME, ck.WEIGHTS_NAME])
    ditkern.save_quantized(model, d, max_shard_size=20_000)


@pytest.mark.parametrize("how", ["path", "class", "instance"])
def test_load_directory_equals_in_memory_model(saved, how):
    model, inputs, out, d = saved
    if how == "path":
        loaded = ditkern.quant.load_quantized(d, backend="torch")
    elif how == "class":
        loaded = ditkern.quant.load_quantized(type(model), d, backend="torch")
    else:
        fresh, _ = tiny.dit()  # other random weights: everything comes from the checkpoint
        loaded = ditkern.quant.load_quantized(fresh, d, backend="torch")
        assert loaded is fresh
    loaded.eval()
    assert type(loaded) is type(model) and ditkern.is_patched(loaded)
    assert torch.equal(_run(loaded, inputs), out)
    layers = quantized_layers(loaded)
    assert set(layers) == set(quantized_layers(model))
    # no full-precision weight was materialised: the quantized layers hold a one-element placeholder
    mods = dict(loaded.named_modules())
    assert all(mods[p].weight.stride() == (0, 0) for p in layers)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    ditkern.unpatch(loaded)  # leaves the dequantized weights
    for p, qw in layers.items():
        assert torch.equal(mods[p].weight, qw.dequantize(mods[p].weight.dtype))
        assert isinstance(mods[p].weight, torch.nn.Parameter) and mods[p].weight.stride()[1] == 1
    torch.testing.assert_close(_run(loaded, inputs), out, rtol=1e-5, atol=1e-5)


def test_single_file_loads_by_path(saved, tmp_path):
    model, inputs, out, _ = saved
    f = str(tmp_path / "sub" / "q.safetensors")  # parent directory created
    ditkern.save_quantized(model, f)
    assert torch.equal(_run(ditkern.quant.load_quantized(f, backend="torch").eval(), inputs), out)


def test_missing_and_wrong_paths_are_named(saved, tmp_path):
    from safetensors.torch import save_file

    model, _, _, d = saved
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="'.*nope' does not exist"):
        ditkern.quant.load_quantized(missing)
    plain = tmp_path / "plain"
    tiny.dit()[0].save_pretrained(plain)  # an ordinary diffusers model directory
    with pytest.raises(ValueError, match="plain' is a model directory but not a ditkern quantized checkpoint"):
        ditkern.quant.load_quantized(str(plain))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty' is not a ditkern quantized checkpoint"):
        ditkern.quant.load_quantized(str(tmp_path / "empty"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors' is not a readable safetensors file"):
        ditkern.quant.load_quantized(str(junk))
    bare = str(tmp_path / "bare.safetensors")
    save_file({"x": torch.ones(2)}, bare)
    with pytest.raises(ValueError, match="bare.safetensors' is a safetensors file but not a ditkern"):
        ditkern.quant.load_quantized(bare)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"")
    with pytest.raises(ValueError, match="weights.bin' is neither a directory nor a .safetensors file"):
        ditkern.quant.load_quantized(str(other))
    with pytest.raises(ValueError, match="weights.bin' is an existing file that does not end in .safetensors"):
        ditkern.save_quantized(model, str(other))
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(ValueError, match="d.safetensors' is a directory; a file path must end in .safetensors"):
        ditkern.save_quantized(model, str(tmp_path / "d.safetensors"))
    with pytest.raises(ValueError, match="max_shard_size=0"):
        ditkern.save_quantized(model, d, max_shard_size=0)
    with pytest.raises(TypeError, match=r"load_quantized\(path\) takes a path"):
        ditkern.quant.load_quantized(tiny.dit()[0])
    broken = tmp_path / "broken"
    ditkern.save_quantized(model, str(broken), max_shard_size=20_000)
    first = sorted(f for f in os.listdir(broken) if f.startswith("diffusion_pytorch_model-"))[0]
    os.remove(broken / first)
    with pytest.raises(FileNotFoundError, match=f"{first}' \\(a shard of the checkpoint"):
        ditkern.quant.load_quantized(str(broken))


def test_zoo_pipeline_into_a_pipeline_without_transformer(tmp_path):
    """digits-dit: the quantized transformer saved from the pipeline, loaded into a pipeline made without one."""
    from diffusers import DiTPipeline

    from ditkern import zoo

    pipe = zoo.load("digits-dit")
    ditkern.patch(pipe, quant=ditkern.QuantConfig(format="int4", group_size=32, scale_dtype="bf16"), backend="torch")
    want = zoo.generate(pipe, [3], [0], num_inference_steps=1)
    ditkern.save_quantized(pipe, str(tmp_path / "q"))
    bare = DiTPipeline.from_pretrained(zoo.path("digits-dit"), transformer=None, local_files_only=True)
    bare._ditkern_zoo_name = "digits-dit"
    model = ditkern.quant.load_quantized(bare, str(tmp_path / "q"), backend="torch")
    assert bare.transformer is model and ditkern.is_patched(model)
    assert torch.equal(zoo.generate(bare, [3], [0], num_inference_steps=1), want)
