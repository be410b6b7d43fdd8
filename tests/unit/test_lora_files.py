"""The LoRA files users get, read back by diffusers' own loaders (not by our writer).

The adapters have non-zero up matrices and alpha = 2 x rank, so a file that dropped a layer, used
the wrong alpha or put a text-encoder key where no layer matches would fuse to different weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from safetensors import safe_open

from sdft.adapter_files import KOHYA_WEIGHT_NAME
from sdft.families.sd import StableDiffusion
from sdft.families.sd3 import StableDiffusion3
from sdft.families.sdxl import StableDiffusionXL
from sdft.families.source import ModelSource
from sdft.lora import WEIGHT_NAME, rank_and_alpha
from sdft.model_spec import describe_base, training_metadata
from sdft.output import export_lora
from sdft.tiny import build_sd, build_sd3, build_sdxl

RANK, ALPHA = 4, 8
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def add_trained_lora(module: torch.nn.Module, targets: list[str], seed: int) -> None:
    """An adapter as after some training: lora_B no longer zero."""
    module.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, LoraLayer):
                up = layer.lora_B["default"].weight
                up.copy_(torch.randn(up.shape, generator=generator) * 0.05)


def merged_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights with the adapter folded in, computed by peft from the in-memory model."""
    merged = copy.deepcopy(module)
    for layer in merged.modules():
        if isinstance(layer, LoraLayer):
            layer.merge()
    return {k.replace(".base_layer", ""): v for k, v in merged.state_dict().items() if "lora_" not in k}


def fused_from_file(family, base, output_dir, weight_name: str, roles: list[str]) -> dict[str, dict]:
    pipe = family.pipeline_cls.from_pretrained(str(base))
    pipe.load_lora_weights(str(output_dir), weight_name=weight_name)
    pipe.fuse_lora(components=roles)
    pipe.unload_lora_weights()
    return {role: getattr(pipe, role).state_dict() for role in roles}


def trained_models(family, base):
    models = family.load(ModelSource(str(base)))
    trained = {family.denoiser_role: getattr(models, family.denoiser_role)}
    add_trained_lora(trained[family.denoiser_role], family.lora_target_modules, seed=1)
    for index, role in enumerate(family.trainable_text_encoder_roles):
        trained[role] = getattr(models, role)
        add_trained_lora(trained[role], TEXT_TARGETS, seed=2 + index)
    return trained


def metadata_for(family, trained, base) -> dict[str, str]:
    denoiser = trained[family.denoiser_role]
    return training_metadata(describe_base(family.name, dict(denoiser.config), "epsilon"), base_model=str(base),
                             title="my-lora", resolution=32, steps=2, lora=rank_and_alpha(trained))


def header(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return {"keys": list(handle.keys()), **(handle.metadata() or {})}


@pytest.mark.parametrize("family_cls, build, version, prefixes", [
    (StableDiffusion, build_sd, "sd_v1", ["lora_te_text_model_"]),
    (StableDiffusionXL, build_sdxl, "sdxl_base_v1-0", ["lora_te1_text_model_", "lora_te2_text_model_"]),
])
def test_kohya_and_peft_files_fuse_to_the_trained_weights(tmp_path, family_cls, build, version, prefixes):
    family = family_cls()
    base = build(tmp_path / "base")
    trained = trained_models(family, base)
    out = tmp_path / "out"
    out.mkdir()
    export_lora(family, trained, out, kohya=True, metadata=metadata_for(family, trained, base))

    kohya = header(out / KOHYA_WEIGHT_NAME)
    text_keys = [k for k in kohya["keys"] if k.startswith("lora_te")]
    assert text_keys and all("_text_model_" in k for k in text_keys), text_keys[:3]
    for prefix in prefixes:   # every encoder has its layers, under the name ComfyUI/Forge look for
        assert any(k.startswith(prefix + "encoder_layers_0_self_attn_k_proj.lora_down") for k in text_keys), prefix
    assert {k.rsplit(".", 1)[-1] for k in kohya["keys"] if k.endswith("alpha")} == {"alpha"}

    roles = list(trained)
    expected = {role: merged_state(module) for role, module in trained.items()}
    untouched = family.load(ModelSource(str(base)))
    for role in roles:   # the comparison means something: the adapters move the weights
        assert any(not torch.equal(expected[role][k], v) for k, v in getattr(untouched, role).state_dict().items())
    for weight_name in (WEIGHT_NAME, KOHYA_WEIGHT_NAME):
        fused = fused_from_file(family, base, out, weight_name, roles)
        for role in roles:
            assert fused[role].keys() == expected[role].keys()
            worst = max((fused[role][k] - expected[role][k]).abs().max().item() for k in expected[role])
            assert worst < 1e-5, f"{weight_name}: {role} fused weights differ by {worst}"

    for path in (out / WEIGHT_NAME, out / KOHYA_WEIGHT_NAME):
        meta = header(path)
        assert meta["ss_network_dim"] == str(RANK) and meta["ss_network_alpha"] == str(ALPHA)
        assert meta["ss_base_model_version"] == version
        assert meta["ss_sd_model_name"] == str(base)
        assert meta["modelspec.architecture"].endswith("/lora")
        assert meta["modelspec.resolution"] == "32x32" and meta["modelspec.title"] == "my-lora"
        assert meta["ss_steps"] == "2" and "modelspec.date" in meta


def test_sd3_lora_keeps_the_diffusers_layout_and_gains_metadata(tmp_path):
    family = StableDiffusion3()
    base = build_sd3(tmp_path / "base")
    models = family.load(ModelSource(str(base)))
    trained = {"transformer": models.transformer}
    add_trained_lora(models.transformer, family.lora_target_modules, seed=1)
    out = tmp_path / "out"
    out.mkdir()
    export_lora(family, trained, out, kohya=False, metadata=metadata_for(family, trained, base))

    meta = header(out / WEIGHT_NAME)
    assert all(k.startswith("transformer.") and ".lora_" in k for k in meta["keys"])
    assert meta["ss_base_model_version"] == "sd3"
    assert meta["modelspec.architecture"] == "stable-diffusion-3-medium/lora"
    assert "lora_adapter_metadata" in meta   # diffusers' own header entry survives the rewrite
    fused = fused_from_file(family, base, out, WEIGHT_NAME, ["transformer"])["transformer"]
    expected = merged_state(models.transformer)
    assert max((fused[k] - expected[k]).abs().max().item() for k in expected) < 1e-5
