"""`python -m sdft.lora_tools`: merge, resize, extract and convert, checked against diffusers' own loader."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoHaConfig, LoKrConfig, LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from sdft.adapter_files import KOHYA_WEIGHT_NAME, save_kohya
from sdft.lora_tools import main
from sdft.tiny import build_sd, build_sdxl

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]   # linear, 1x1 and 3x3 layers


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


def trained_file(base, folder, config, seed: int = 0, text_encoder: bool = False):
    """A kohya-layout file of adapters whose every factor is random (as after training)."""
    pipe = StableDiffusionPipeline.from_pretrained(str(base))
    pipe.unet.add_adapter(config)
    modules = {"unet": pipe.unet}
    if text_encoder:
        pipe.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=1, target_modules=["q_proj", "v_proj", "fc1"]))
        modules["text_encoder"] = pipe.text_encoder
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in [p for m in modules.values() for p in m.named_parameters()]:
            if "magnitude" in name:   # DoRA: the magnitude moves a little from its start, ||W||
                param.mul_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            elif any(part in name for part in ("lora_", "hada_", "lokr_")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    folder.mkdir()
    return save_kohya(folder, modules, {"text_encoder": "lora_te"}), pipe


def unet_weights(pipe) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_merge_equals_diffusers_load_and_fuse(base, tmp_path):
    lora, _ = trained_file(base, tmp_path / "lora", LoraConfig(r=4, lora_alpha=2, target_modules=TARGETS))
    assert main(["merge", "--base", str(base), "--lora", f"{lora}:0.7", "--output", str(tmp_path / "merged")]) == 0
    merged = unet_weights(StableDiffusionPipeline.from_pretrained(str(tmp_path / "merged")))

    pipe = StableDiffusionPipeline.from_pretrained(str(base))
    untouched = unet_weights(pipe)
    pipe.load_lora_weights(str(lora.parent), weight_name=KOHYA_WEIGHT_NAME)
    pipe.fuse_lora(components=["unet"], lora_scale=0.7)
    pipe.unload_lora_weights()
    fused = unet_weights(pipe)
    assert max_diff(fused, untouched) > 1e-3
    assert max_diff(merged, fused) < 1e-5


@pytest.mark.parametrize("config", [LoHaConfig(r=4, alpha=2, target_modules=TARGETS),
                                    LoraConfig(r=4, lora_alpha=2, target_modules=TARGETS, use_dora=True)],
                         ids=["loha", "dora"])
def test_merge_of_loha_and_dora_equals_peft_merge(config, base, tmp_path):
    loha, pipe = trained_file(base, tmp_path / "loha", config)
    for layer in pipe.unet.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.merge()
    expected = {k.replace(".base_layer", ""): v for k, v in pipe.unet.state_dict().items()
                if "hada_" not in k and "lora_" not in k}
    assert main(["merge", "--base", str(base), "--lora", str(loha), "--output", str(tmp_path / "merged")]) == 0
    merged = unet_weights(StableDiffusionPipeline.from_pretrained(str(tmp_path / "merged")))
    assert max_diff(merged, expected) < 1e-5


def test_resize_to_full_rank_is_lossless_and_lower_rank_reports_the_kept_share(base, tmp_path, capsys):
    lora, _ = trained_file(base, tmp_path / "lora", LoraConfig(r=4, lora_alpha=2, target_modules=TARGETS))
    for args, name in ((["--rank", "4"], "full.safetensors"), (["--rank", "1"], "one.safetensors"),
                       (["--sv_fro", "0.9"], "fro.safetensors")):
        assert main(["resize", "--lora", str(lora), "--output", str(tmp_path / name), *args]) == 0
    reports = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert reports[0]["kept_frobenius_share_min"] == pytest.approx(1.0)
    assert 0 < reports[1]["kept_frobenius_share_min"] < 0.99
    assert reports[2]["kept_frobenius_share_min"] >= 0.9

    outputs = {}
    for name in ("full.safetensors", "one.safetensors", "fro.safetensors"):
        folder = tmp_path / name.removesuffix(".safetensors")
        assert main(["merge", "--base", str(base), "--lora", str(tmp_path / name), "--output", str(folder)]) == 0
        outputs[name] = unet_weights(StableDiffusionPipeline.from_pretrained(str(folder)))
    assert main(["merge", "--base", str(base), "--lora", str(lora), "--output", str(tmp_path / "orig")]) == 0
    original = unet_weights(StableDiffusionPipeline.from_pretrained(str(tmp_path / "orig")))
    assert max_diff(outputs["full.safetensors"], original) < 1e-5
    assert max_diff(outputs["one.safetensors"], original) > 1e-4
    one = load_file(str(tmp_path / "one.safetensors"))
    assert {v.shape[0] for k, v in one.items() if k.endswith("lora_down.weight")} == {1}


def test_extract_recovers_the_merged_delta(base, tmp_path, capsys):
    lora, _ = trained_file(base, tmp_path / "lora", LoraConfig(r=4, lora_alpha=2, target_modules=TARGETS))
    assert main(["merge", "--base", str(base), "--lora", str(lora), "--output", str(tmp_path / "tuned")]) == 0
    out = tmp_path / "extracted.safetensors"
    assert main(["extract", "--base", str(base), "--tuned", str(tmp_path / "tuned"), "--rank", "4",
                 "--output", str(out)]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["layers"] == len({k.split(".")[0] for k in load_file(str(lora))})
    assert report["kept_frobenius_share_min"] == pytest.approx(1.0, abs=1e-6)   # rank 4 holds a rank-4 delta
    assert main(["merge", "--base", str(base), "--lora", str(out), "--output", str(tmp_path / "again")]) == 0
    tuned = unet_weights(StableDiffusionPipeline.from_pretrained(str(tmp_path / "tuned")))
    again = unet_weights(StableDiffusionPipeline.from_pretrained(str(tmp_path / "again")))
    assert max_diff(again, tuned) < 1e-5


def test_bad_inputs_are_named(base, tmp_path, capsys):
    loha, _ = trained_file(base, tmp_path / "loha", LoHaConfig(r=4, alpha=2, target_modules=TARGETS))
    assert main(["resize", "--lora", str(loha), "--output", str(tmp_path / "x.safetensors"), "--rank", "2"]) == 1
    assert "is not a LoRA entry" in capsys.readouterr().err
    other = build_sdxl(tmp_path / "tiny-sdxl")
    assert main(["merge", "--base", str(other), "--lora", str(loha), "--output", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert "names no layer of the base" in err and "lora_unet_" in err
    with pytest.raises(SystemExit):
        main(["merge", "--base", str(base), "--lora", str(tmp_path / "missing.safetensors"), "--output", "m"])
    assert "missing.safetensors' is not a file" in capsys.readouterr().err


@pytest.mark.parametrize("config", [
    LoraConfig(r=4, lora_alpha=2, target_modules=TARGETS),
    LoHaConfig(r=4, alpha=2, target_modules=TARGETS),
    LoKrConfig(r=4, alpha=3, target_modules=TARGETS, decompose_factor=4),   # full and decomposed factors
], ids=["lora", "loha", "lokr"])
def test_convert_round_trips_each_type(config, base, tmp_path):
    kohya, _ = trained_file(base, tmp_path / "a", config)
    peft, back, again = (tmp_path / f"{n}.safetensors" for n in ("peft", "back", "again"))
    assert main(["convert", "--input", str(kohya), "--output", str(peft), "--base", str(base)]) == 0
    assert main(["convert", "--input", str(peft), "--output", str(back)]) == 0
    assert main(["convert", "--input", str(back), "--output", str(again), "--base", str(base)]) == 0
    original, returned = load_file(str(kohya)), load_file(str(back))
    assert original.keys() == returned.keys() and all(k.startswith("lora_unet_") for k in returned)
    if isinstance(config, LoKrConfig):
        assert any(k.endswith(".lokr_w1") for k in original) and any(k.endswith(".lokr_w2_a") for k in original)
    for key, value in original.items():   # LoKr's full lokr_w1 goes through / and * alpha/rank: 1 ulp
        torch.testing.assert_close(returned[key], value, rtol=2e-7, atol=0, msg=key)
    first, second = load_file(str(peft)), load_file(str(again))
    assert first.keys() == second.keys() and all(k.startswith("unet.") for k in first)
    assert all(torch.equal(first[k], second[k]) or "lokr_w1" in k for k in first)


def test_converted_lora_fuses_in_diffusers_to_the_trained_weights(base, tmp_path):
    kohya, trained = trained_file(base, tmp_path / "a", LoraConfig(r=4, lora_alpha=2, target_modules=TARGETS),
                                  text_encoder=True)
    expected = {}
    for role in ("unet", "text_encoder"):
        module = getattr(trained, role)
        for layer in module.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.merge()
        expected[role] = {k.replace(".base_layer", ""): v for k, v in module.state_dict().items() if "lora_" not in k}
    folder = tmp_path / "peft"
    folder.mkdir()
    assert main(["convert", "--input", str(kohya), "--output", str(folder / "lora.safetensors"),
                 "--base", str(base)]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(str(base))
    pipe.load_lora_weights(str(folder), weight_name="lora.safetensors")
    pipe.fuse_lora(components=["unet", "text_encoder"])
    pipe.unload_lora_weights()
    untouched = StableDiffusionPipeline.from_pretrained(str(base))
    for role in ("unet", "text_encoder"):
        assert max_diff(getattr(untouched, role).state_dict(), expected[role]) > 1e-3
        assert max_diff(getattr(pipe, role).state_dict(), expected[role]) < 1e-5


def test_convert_names_what_it_cannot_read(base, tmp_path, capsys):
    kohya, _ = trained_file(base, tmp_path / "a", LoraConfig(r=4, lora_alpha=2, target_modules=TARGETS))
    out = str(tmp_path / "out.safetensors")
    assert main(["convert", "--input", str(kohya), "--output", out]) == 1
    assert "add --base" in capsys.readouterr().err
    assert main(["convert", "--input", str(kohya), "--output", out, "--base", str(build_sdxl(tmp_path / "xl"))]) == 1
    assert "'lora_unet_" in capsys.readouterr().err
    assert main(["convert", "--input", str(tmp_path / "missing.safetensors"), "--output", out]) == 1
    assert "missing.safetensors' is not a file" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    save_file({"unet.a.weight": torch.zeros(1)}, str(bad))
    assert main(["convert", "--input", str(bad), "--output", out]) == 1
    assert "'unet.a.weight' is not a LoRA, LoHa or LoKr parameter" in capsys.readouterr().err
