"""Every adapter type, trained by the scripts and exported in the kohya/LyCORIS layout UIs load.

The exported file is read back with a merge written here from the published layout formulas
(kohya/LyCORIS, as ComfyUI, Forge and A1111 apply them), not with sdft's reader, and compared with
the trained peft adapters folded into the weights by peft itself, captured when the run finishes.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file

import sdft.output
import sdft.trainer
import train_text_to_image as t2i
import train_text_to_image_sdxl as sdxl_script
from sdft.adapter_files import KOHYA_WEIGHT_NAME
from sdft.cli import run
from sdft.lora import WEIGHT_NAME
from tests.integration.conftest import sd_args

pytestmark = pytest.mark.integration
STEPS = ["--max_train_steps", "2", "--checkpointing_steps", "100", "--report_to", "none", "--learning_rate", "1e-2"]
ADAPTER_KEYS = ("lora_", "hada_", "lokr_")


def peft_merged(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's weights with its adapters folded in, by peft."""
    merged = copy.deepcopy(module)
    for layer in merged.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.merge()
    return {k.replace(".base_layer", ""): v.detach().float() for k, v in merged.state_dict().items()
            if not any(part in k for part in ADAPTER_KEYS)}


def capture_merged_before(monkeypatch, module, name: str) -> dict:
    """peft's merged weights of every trained module when the run reaches `module.name(run)`."""
    captured = {}
    original = getattr(module, name)

    def capture(run_):
        captured.update({role: peft_merged(m) for role, m in run_.trained.modules.items()})
        return original(run_)

    monkeypatch.setattr(module, name, capture)
    return captured


@pytest.fixture()
def merged_at_finish(monkeypatch):
    """peft's merged weights of every trained module when the run reaches the export."""
    return capture_merged_before(monkeypatch, sdft.output, "finish")


def kohya_names(prefix: str, module: torch.nn.Module, text_model_level: bool) -> dict[str, str]:
    """UI key map: lora_<prefix>_<module path, dots as underscores> -> the module's weight key."""
    level = "text_model." if text_model_level and not hasattr(module, "text_model") else ""
    return {f"{prefix}_{(level + name).replace('.', '_')}": f"{name}.weight" for name, layer in module.named_modules()
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d))}


def delta_from_entry(entry: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """The weight update of one file entry, from the published kohya/LyCORIS formulas."""
    alpha = float(entry["alpha"]) if "alpha" in entry else None
    if "lora_down.weight" in entry:
        down, up = entry["lora_down.weight"], entry["lora_up.weight"]
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        return (up.flatten(1) @ down.flatten(1)).reshape(shape) * scale
    if "hada_w1_a" in entry:
        scale = alpha / entry["hada_w1_b"].shape[0]
        w1 = entry["hada_w1_a"] @ entry["hada_w1_b"]
        w2 = entry["hada_w2_a"] @ entry["hada_w2_b"]
        return (w1 * w2).reshape(shape) * scale
    dim = None
    if "lokr_w1" in entry:
        w1 = entry["lokr_w1"]
    else:
        w1, dim = entry["lokr_w1_a"] @ entry["lokr_w1_b"], entry["lokr_w1_b"].shape[0]
    if "lokr_w2" in entry:
        w2 = entry["lokr_w2"]
    else:
        w2, dim = entry["lokr_w2_a"] @ entry["lokr_w2_b"].flatten(1), entry["lokr_w2_b"].shape[0]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    scale = alpha / dim if dim is not None and alpha is not None else 1.0
    return torch.kron(w1, w2).reshape(shape) * scale


def merge_entry(weight: torch.Tensor, entry: dict[str, torch.Tensor]) -> torch.Tensor:
    """One weight with one file entry applied. A dora_scale with one entry per output row is applied as
    ComfyUI's and Forge's weight_decompose do: (W + delta) * dora_scale / (||W|| + eps), the norm per
    output row of the base weight W."""
    merged = weight + delta_from_entry(entry, weight.shape)
    if "dora_scale" not in entry:
        return merged
    scale = entry["dora_scale"]
    assert scale.shape == (weight.shape[0], *[1] * (weight.dim() - 1)), scale.shape
    norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(scale.shape) + torch.finfo(torch.float32).eps
    return merged * scale / norm


def merge_file(path, components: dict[str, tuple[str, torch.nn.Module]],
               names: dict[str, tuple[str, str]] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Base weights plus every entry of the file; `components` maps role -> (kohya prefix, base module),
    `names` (default: every Linear/Conv2d under its kohya name) kohya name -> (role, weight key).
    Fails on any key that names no module of the model."""
    tensors = load_file(str(path))
    entries: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, suffix = key.split(".", 1)
        entries.setdefault(name, {})[suffix] = value.float()
    if names is None:
        names = {}
        for role, (prefix, module) in components.items():
            names.update({n: (role, w) for n, w in kohya_names(prefix, module, prefix != "lora_unet").items()})
    unmatched = [name for name in entries if name not in names]
    assert not unmatched, f"{len(unmatched)} keys match no module, e.g. {unmatched[:3]}"
    merged = {role: {k: v.detach().float().clone() for k, v in module.state_dict().items()}
              for role, (_, module) in components.items()}
    for name, entry in entries.items():
        role, weight = names[name]
        merged[role][weight] = merge_entry(merged[role][weight], entry)
    return merged


def metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


FAMILIES = {
    "sd": (t2i, StableDiffusionPipeline, {"unet": "lora_unet"}, []),
    "sdxl": (sdxl_script, StableDiffusionXLPipeline,
             {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}, ["--train_text_encoder"]),
}
TYPES = {
    "lora": ["--lora_type", "lora", "--lora_targets", "attn-mlp", "--output_kohya_format"],
    "locon": ["--lora_type", "locon", "--conv_rank", "2", "--conv_alpha", "1", "--output_kohya_format"],
    "loha": ["--lora_type", "loha", "--lora_targets", "full"],
    "lokr": ["--lora_type", "lokr", "--lora_targets", "full", "--lokr_factor", "4"],
    "dora": ["--lora_type", "locon", "--use_dora", "--conv_rank", "2", "--conv_alpha", "1", "--output_kohya_format"],
}
NETWORK = {"lora": ("networks.lora", None), "locon": ("networks.lora", None), "loha": ("lycoris.kohya", "loha"),
           "lokr": ("lycoris.kohya", "lokr"), "dora": ("lycoris.kohya", "locon")}


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("adapter", list(TYPES))
def test_each_adapter_type_exports_a_file_that_merges_to_the_trained_weights(
        adapter, family, tiny_sd, tiny_sdxl, image_folder, tmp_path, merged_at_finish):
    script, pipeline_cls, prefixes, extra = FAMILIES[family]
    model = tiny_sd if family == "sd" else tiny_sdxl
    output = tmp_path / "out"
    argv = sd_args(model, image_folder, output, *STEPS, "--use_lora", "--rank", "4", "--lora_alpha", "2",
                   *TYPES[adapter], *extra)
    assert run(script.main, script.parse_args([str(a) for a in argv])) == 0

    base = pipeline_cls.from_pretrained(str(model))
    components = {role: (prefix, getattr(base, role)) for role, prefix in prefixes.items()}
    merged = merge_file(output / KOHYA_WEIGHT_NAME, components)
    assert set(merged_at_finish) == set(prefixes)
    for role in prefixes:
        expected, found = merged_at_finish[role], merged[role]
        moved = max((expected[k] - components[role][1].state_dict()[k].float()).abs().max().item() for k in expected)
        assert moved > 1e-4, f"{role}: training did not move the weights"
        worst = max((found[k] - expected[k]).abs().max().item() for k in expected)
        assert worst < 1e-5, f"{adapter}/{family} {role}: file merges {worst} away from the trained weights"

    header = metadata(output / KOHYA_WEIGHT_NAME)
    module, algo = NETWORK[adapter]
    args = json.loads(header["ss_network_args"])
    assert header["ss_network_module"] == module and args.get("algo") == algo
    assert header["ss_network_dim"] == "4" and header["ss_network_alpha"] == "2"
    keys = load_file(str(output / KOHYA_WEIGHT_NAME)).keys()
    if adapter != "lora":   # the 3x3 convolutions are adapted
        assert any("resnets_0_conv1." in k for k in keys)
        assert args["conv_dim"] == ("4" if adapter in ("loha", "lokr") else "2")
    assert any(k.endswith(".dora_scale") for k in keys) == (adapter == "dora")
    # diffusers loads LoRA/LoCon (DoRA too) from its own file; LoHa/LoKr exist only in the LyCORIS layout
    assert (output / WEIGHT_NAME).exists() == (adapter in ("lora", "locon", "dora"))


def test_lora_alpha_scales_the_update_and_reaches_the_files(tiny_sd, image_folder, tmp_path):
    """--lora_alpha 1 --rank 8: diffusers' loader folds in (1/8) up @ down, and both files say alpha 1."""
    output = tmp_path / "out"
    argv = sd_args(tiny_sd, image_folder, output, *STEPS, "--use_lora", "--rank", "8", "--lora_alpha", "1",
                   "--output_kohya_format")
    assert run(t2i.main, t2i.parse_args([str(a) for a in argv])) == 0

    kohya = load_file(str(output / KOHYA_WEIGHT_NAME))
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {1.0}
    for path in (output / WEIGHT_NAME, output / KOHYA_WEIGHT_NAME):
        assert metadata(path)["ss_network_alpha"] == "1" and metadata(path)["ss_network_dim"] == "8"

    base = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    base.load_lora_weights(str(output))
    base.fuse_lora(components=["unet"])
    base.unload_lora_weights()
    after = base.unet.state_dict()
    name = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    up, down = kohya[f"lora_unet_{name}.lora_up.weight"], kohya[f"lora_unet_{name}.lora_down.weight"]
    weight = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    update = after[weight] - before[weight]
    assert update.abs().max() > 1e-5
    torch.testing.assert_close(update, (up @ down) / 8, atol=1e-6, rtol=1e-4)


@pytest.fixture()
def merged_at_start(monkeypatch):
    """peft's merged weights of every trained module when the loop starts (after --init_lora)."""
    return capture_merged_before(monkeypatch, sdft.trainer, "train")


@pytest.mark.parametrize("adapter, source", [
    (["--lora_type", "loha", "--lora_targets", "attn-mlp"], KOHYA_WEIGHT_NAME),      # kohya/LyCORIS layout
    (["--lora_targets", "attn-mlp", "--lora_alpha", "2"], WEIGHT_NAME),             # diffusers/PEFT layout
])
def test_init_lora_starts_from_the_file_of_a_previous_run(adapter, source, tiny_sd, image_folder, tmp_path,
                                                          merged_at_finish, merged_at_start):
    first, second = tmp_path / "first", tmp_path / "second"
    argv = sd_args(tiny_sd, image_folder, first, *STEPS, "--use_lora", *adapter)
    assert run(t2i.main, t2i.parse_args([str(a) for a in argv])) == 0
    finished = {role: dict(state) for role, state in merged_at_finish.items()}

    argv = sd_args(tiny_sd, image_folder, second, *STEPS, "--use_lora", *adapter, "--init_lora", first / source)
    assert run(t2i.main, t2i.parse_args([str(a) for a in argv])) == 0
    started = merged_at_start["unet"]
    worst = max((started[k] - finished["unet"][k]).abs().max().item() for k in started)
    assert worst < 1e-6, f"the second run starts {worst} away from where the first ended"


@pytest.mark.parametrize("flags, message", [
    (["--rank", "8"], "'lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a' has shape (32, 4), "
                      "the model's adapter (32, 8)"),
    (["--lora_type", "lokr"], "has no 'lora_unet_down_blocks_0_attentions_0_proj_in.lokr_w1'"),   # LoHa file, LoKr run
    (["--lora_alpha", "3"], "is 2, the run's alpha 3"),
    (["--lora_targets", "attn"], "matches no adapted layer"),
])
def test_init_lora_names_the_first_key_that_does_not_match(flags, message, tiny_sd, image_folder, tmp_path, capsys):
    first = tmp_path / "first"
    argv = sd_args(tiny_sd, image_folder, first, *STEPS, "--use_lora", "--lora_type", "loha", "--lora_alpha", "2",
                   "--lora_targets", "attn-mlp")
    assert run(t2i.main, t2i.parse_args([str(a) for a in argv])) == 0
    base = {"--rank": "4", "--lora_type": "loha", "--lora_alpha": "2", "--lora_targets": "attn-mlp"}
    base.update(dict(zip(flags[::2], flags[1::2])))
    argv = sd_args(tiny_sd, image_folder, tmp_path / "second", *STEPS, "--use_lora",
                   *[item for pair in base.items() for item in pair], "--init_lora", first / KOHYA_WEIGHT_NAME)
    capsys.readouterr()
    assert run(t2i.main, t2i.parse_args([str(a) for a in argv])) == 1
    err = capsys.readouterr().err
    assert message in err and "lora_unet_" in err, err


def test_dora_trains_and_diffusers_loads_it(tiny_sd, image_folder, tmp_path, merged_at_finish):
    output = tmp_path / "out"
    argv = sd_args(tiny_sd, image_folder, output, *STEPS, "--use_lora", "--use_dora", "--lora_alpha", "2")
    assert run(t2i.main, t2i.parse_args([str(a) for a in argv])) == 0
    assert json.loads(metadata(output / WEIGHT_NAME)["ss_network_args"])["dora_wd"] == "True"
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
    pipe.load_lora_weights(str(output))
    pipe.fuse_lora(components=["unet"])
    pipe.unload_lora_weights()
    fused, expected = pipe.unet.state_dict(), merged_at_finish["unet"]
    worst = max((fused[k] - expected[k]).abs().max().item() for k in expected)
    assert worst < 1e-5, f"diffusers' DoRA fuse is {worst} away from the trained weights"


def test_loraplus_trains_up_matrices_at_the_ratio_per_group(tiny_sdxl, image_folder, tmp_path, monkeypatch):
    """--loraplus_lr_ratio 16: the U-Net's and the text encoders' lora_B weights each get 16 x their
    group's rate; the lora_A weights keep it."""
    seen = {}
    train = sdft.trainer.train

    def capture(run_):
        names = {id(p): name for module in run_.trained.modules.values() for name, p in module.named_parameters()}
        seen["groups"] = [(group["lr"], {names[id(p)].split(".lora_")[1][0] for p in group["params"]},
                           len(group["params"])) for group in run_.optimizer.optimizer.param_groups]
        return train(run_)

    monkeypatch.setattr(sdft.trainer, "train", capture)
    argv = sd_args(tiny_sdxl, image_folder, tmp_path / "out", *STEPS, "--use_lora", "--train_text_encoder",
                   "--loraplus_lr_ratio", "16")
    assert run(sdxl_script.main, sdxl_script.parse_args([str(a) for a in argv])) == 0
    lrs = [(lr, kinds) for lr, kinds, _ in seen["groups"]]
    assert lrs == [(pytest.approx(1e-2), {"A"}), (pytest.approx(0.16), {"B"})] * 2   # U-Net, then text encoders


def test_lokr_run_resumes_exactly_and_validates_with_the_file_it_writes(tiny_sd, image_folder, tmp_path):
    """LoKr checkpoints are the LyCORIS file: a run resumed from step 2 ends with the same file as a
    straight 4-step run, and the final images come from that file."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--report_to", "none", "--learning_rate", "1e-2",
              "--use_lora", "--lora_type", "lokr", "--lora_targets", "full", "--lokr_factor", "4", "--lora_alpha", "2"]
    argv = sd_args(tiny_sd, image_folder, straight, *common, "--validation_prompt", "a red circle",
                   "--num_validation_images", "1")
    assert run(t2i.main, t2i.parse_args([str(a) for a in argv])) == 0
    assert (straight / "checkpoint-2" / KOHYA_WEIGHT_NAME).exists()
    assert list((straight / "validation" / "final").glob("*.png"))
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    argv = sd_args(tiny_sd, image_folder, resumed, *common, "--resume_from_checkpoint", "latest")
    assert run(t2i.main, t2i.parse_args([str(a) for a in argv])) == 0
    a, b = load_file(str(straight / KOHYA_WEIGHT_NAME)), load_file(str(resumed / KOHYA_WEIGHT_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any("lokr_w1_a" in k or "lokr_w2_a" in k for k in a) and any(
        k.endswith(".lokr_w1") for k in a)   # both LoKr forms, decomposed and full, were written and resumed
