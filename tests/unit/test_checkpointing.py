"""Resumable checkpoints: finding them, rotating them, resuming from them, and atomic saves."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from sdft.checkpointing import (
    STATE_FILE,
    Checkpointer,
    Position,
    TrainedWeights,
    list_checkpoints,
    read_position,
    resolve_resume,
    rotate,
)
from sdft.ema import EMA


def make_checkpoints(output: Path, steps) -> None:
    for step in steps:
        (output / f"checkpoint-{step}").mkdir(parents=True)


def names(found) -> list[str]:
    return [path.name for _, path in found]


# --------------------------------------------------------------------------- finding and rotating


def test_list_checkpoints_sorts_numerically_and_ignores_strays(tmp_path):
    make_checkpoints(tmp_path, [10, 9, 100, 2])
    (tmp_path / "checkpoints.txt").write_text("notes")
    (tmp_path / "checkpoint-abc").mkdir()
    (tmp_path / "checkpoint-3").write_text("a file, not a folder")
    (tmp_path / ".checkpoint-4.partial").mkdir()
    (tmp_path / "checkpoint-5.partial").mkdir()
    (tmp_path / "unet").mkdir()
    found = list_checkpoints(tmp_path)
    assert names(found) == ["checkpoint-2", "checkpoint-9", "checkpoint-10", "checkpoint-100"]
    assert [step for step, _ in found] == [2, 9, 10, 100]
    assert all(path.parent == tmp_path for _, path in found)


def test_list_checkpoints_of_a_missing_folder_is_empty(tmp_path):
    assert list_checkpoints(tmp_path / "not-created-yet") == []


def test_rotate_keeps_the_newest(tmp_path):
    make_checkpoints(tmp_path, [9, 10, 2, 11])
    (tmp_path / ".checkpoint-12.partial").mkdir()
    removed = rotate(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["checkpoint-2", "checkpoint-9"]
    assert names(list_checkpoints(tmp_path)) == ["checkpoint-10", "checkpoint-11"]
    assert not (tmp_path / "checkpoint-2").exists() and not (tmp_path / "checkpoint-9").exists()
    assert (tmp_path / ".checkpoint-12.partial").is_dir()   # not a checkpoint: not rotate's business
    assert rotate(tmp_path, keep=2) == []


# --------------------------------------------------------------------------- resolving --resume_from_checkpoint


def test_resolve_latest_is_the_newest(tmp_path):
    make_checkpoints(tmp_path, [9, 10])
    (tmp_path / ".checkpoint-11.partial").mkdir()
    assert resolve_resume("latest", tmp_path) == tmp_path / "checkpoint-10"


def test_resolve_latest_without_checkpoints_is_none(tmp_path):
    assert resolve_resume("latest", tmp_path) is None
    assert resolve_resume("latest", tmp_path / "missing") is None
    assert resolve_resume(None, tmp_path) is None


def test_resolve_bare_name_inside_output_dir(tmp_path, monkeypatch):
    output = tmp_path / "run"
    make_checkpoints(output, [3, 6])
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert resolve_resume("checkpoint-3", output) == output / "checkpoint-3"


def test_resolve_absolute_path_outside_output_dir_is_used_as_given(tmp_path):
    output = tmp_path / "run-b"
    other = tmp_path / "run-a"
    make_checkpoints(output, [4])
    make_checkpoints(other, [4])
    assert resolve_resume(str(other / "checkpoint-4"), output) == other / "checkpoint-4"


def test_resolve_missing_checkpoint_raises_naming_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_checkpoints(tmp_path / "run", [2])
    with pytest.raises(FileNotFoundError, match="checkpoint-7"):
        resolve_resume("checkpoint-7", tmp_path / "run")


def test_read_position_from_training_state(tmp_path):
    checkpoint = tmp_path / "checkpoint-12"
    checkpoint.mkdir()
    position = Position(global_step=12, epoch=3, batches_in_epoch=5, seed=1234)
    (checkpoint / STATE_FILE).write_text(json.dumps(asdict(position)))
    assert read_position(checkpoint) == position


def test_read_position_of_a_diffusers_checkpoint_uses_the_name(tmp_path):
    # The diffusers example scripts write no training_state.json; the folder name holds the step.
    checkpoint = tmp_path / "checkpoint-1500"
    (checkpoint / "unet").mkdir(parents=True)
    position = read_position(checkpoint)
    assert position == Position(global_step=1500, epoch=-1, batches_in_epoch=0, seed=None)
    # 400 optimizer steps per epoch with 2 accumulation steps: step 1500 is 300 updates into epoch 3.
    assert position.placed(400, 2) == Position(global_step=1500, epoch=3, batches_in_epoch=600, seed=None)
    odd = tmp_path / "my-backup"
    odd.mkdir()
    with pytest.raises(ValueError, match="my-backup"):
        read_position(odd)


# --------------------------------------------------------------------------- saving and loading for real


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    )


class CrashingWeights(TrainedWeights):
    """Writes part of the weights, then fails (a full disk, a killed job)."""

    def save(self, directory: Path, step: int | None = None) -> None:
        (directory / "unet").mkdir(parents=True, exist_ok=True)
        (directory / "unet" / "half-written.safetensors").write_bytes(b"\0" * 64)
        raise RuntimeError("disk full")


@pytest.fixture()
def trained(accelerator):
    unet = tiny_unet()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    take_step(unet, optimizer)
    return unet, optimizer


def take_step(unet, optimizer) -> None:
    # A random gradient instead of a forward/backward pass: the optimizer state is what matters.
    for param in unet.parameters():
        param.grad = torch.randn_like(param)
    optimizer.step()
    optimizer.zero_grad()


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def weights_of(unet, accelerator) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in accelerator.unwrap_model(unet).state_dict().items()}


def test_crash_during_save_leaves_older_checkpoints_and_latest_alone(accelerator, trained, tmp_path):
    unet, _ = trained
    module = accelerator.unwrap_model(unet)
    good = TrainedWeights(pipeline_cls=StableDiffusionPipeline, modules={"unet": module}, lora=False)
    crashing = CrashingWeights(pipeline_cls=StableDiffusionPipeline, modules={"unet": module}, lora=False)
    output = tmp_path / "out"

    Checkpointer(accelerator, output, total_limit=None, weights=good).save(Position(global_step=2, seed=0))
    before = snapshot(output / "checkpoint-2")
    assert "unet/config.json" in before

    with pytest.raises(RuntimeError, match="disk full"):
        Checkpointer(accelerator, output, total_limit=None, weights=crashing).save(Position(global_step=4, seed=0))
    assert snapshot(output / "checkpoint-2") == before
    assert not (output / "checkpoint-4").exists()
    assert names(list_checkpoints(output)) == ["checkpoint-2"]
    assert resolve_resume("latest", output) == output / "checkpoint-2"

    final = Checkpointer(accelerator, output, total_limit=None, weights=good).save(Position(global_step=4, seed=0))
    assert final == output / "checkpoint-4" and final.is_dir()
    assert not (final / "unet" / "half-written.safetensors").exists(), "leftovers of the crashed save were kept"
    assert [p.name for p in output.iterdir() if p.name.startswith(".")] == [], "a hidden partial folder remains"
    assert resolve_resume("latest", output) == final
    assert read_position(final).global_step == 4
    assert snapshot(output / "checkpoint-2") == before


def test_save_load_round_trip(accelerator, trained, tmp_path):
    unet, optimizer = trained
    module = accelerator.unwrap_model(unet)
    ema = EMA({"unet": module}, torch.device("cpu"))
    ema.step({"unet": module})
    weights = TrainedWeights(pipeline_cls=StableDiffusionPipeline, modules={"unet": module}, lora=False, ema=ema)
    checkpointer = Checkpointer(accelerator, tmp_path / "out", total_limit=None, weights=weights)
    position = Position(global_step=3, epoch=1, batches_in_epoch=2, seed=42)

    saved_weights = weights_of(unet, accelerator)
    saved_adam = {k: v.clone() for k, v in optimizer.optimizer.state[next(iter(module.parameters()))].items()}
    saved_ema = [p.clone() for p in ema.averages["unet"].shadow_params]
    folder = checkpointer.save(position)

    assert folder == tmp_path / "out" / "checkpoint-3"
    assert json.loads((folder / STATE_FILE).read_text()) == asdict(position)
    assert (folder / "unet" / "config.json").is_file()
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "unet_ema" / "config.json").is_file()
    # The diffusers-format unet/ is the only copy of the weights: accelerate must not add its own.
    assert not list(folder.glob("model*.safetensors")) and not list(folder.glob("pytorch_model*.bin"))

    take_step(unet, optimizer)
    ema.step({"unet": module})
    with torch.no_grad():
        for param in module.parameters():
            param.add_(1.0)
    assert not torch.equal(next(iter(module.parameters())), next(iter(saved_weights.values())))

    assert checkpointer.load(folder) == position
    restored = weights_of(unet, accelerator)
    assert restored.keys() == saved_weights.keys()
    assert all(torch.equal(restored[k], saved_weights[k]) for k in saved_weights)
    adam = optimizer.optimizer.state[next(iter(module.parameters()))]
    assert all(torch.equal(adam[k], saved_adam[k]) for k in saved_adam)
    assert all(torch.equal(a, b) for a, b in zip(ema.averages["unet"].shadow_params, saved_ema))


def test_total_limit_rotates_after_saving(accelerator, trained, tmp_path):
    unet, _ = trained
    weights = TrainedWeights(pipeline_cls=StableDiffusionPipeline,
                             modules={"unet": accelerator.unwrap_model(unet)}, lora=False)
    checkpointer = Checkpointer(accelerator, tmp_path, total_limit=2, weights=weights)
    for step in (2, 4, 6):
        checkpointer.save(Position(global_step=step, seed=0))
    assert names(list_checkpoints(tmp_path)) == ["checkpoint-4", "checkpoint-6"]


def test_saving_the_same_step_again_replaces_it(accelerator, trained, tmp_path):
    unet, optimizer = trained
    weights = TrainedWeights(pipeline_cls=StableDiffusionPipeline,
                             modules={"unet": accelerator.unwrap_model(unet)}, lora=False)
    checkpointer = Checkpointer(accelerator, tmp_path, total_limit=None, weights=weights)
    checkpointer.save(Position(global_step=4, epoch=0, seed=0))
    take_step(unet, optimizer)
    checkpointer.save(Position(global_step=4, epoch=1, seed=0))
    assert read_position(tmp_path / "checkpoint-4").epoch == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]


def test_ema_of_a_transformers_text_encoder_saves_loads_and_swaps(tmp_path):
    """A trained CLIP encoder's average (issue 16), which EMAModel.save_pretrained cannot write: its
    shadow weights and step count come back from the checkpoint folder."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2,
                                           num_hidden_layers=1, vocab_size=50, max_position_embeddings=8))
    ema = EMA({"text_encoder": encoder}, torch.device("cpu"))
    for _ in range(2):
        with torch.no_grad():
            for param in encoder.parameters():
                param.add_(torch.randn_like(param))
        ema.step({"text_encoder": encoder})
    ema.save(tmp_path)
    average = ema.averages["text_encoder"]
    restored = EMA({"text_encoder": encoder}, torch.device("cpu"))
    restored.load(tmp_path)
    again = restored.averages["text_encoder"]
    assert again.optimization_step == average.optimization_step == 2
    assert all(torch.equal(a, b) for a, b in zip(again.shadow_params, average.shadow_params))
    raw = [p.detach().clone() for p in encoder.parameters()]
    with restored.swapped_in({"text_encoder": encoder}):
        assert all(torch.equal(p, s) for p, s in zip(encoder.parameters(), average.shadow_params))
    assert all(torch.equal(p, r) for p, r in zip(encoder.parameters(), raw))
    assert not all(torch.equal(s, r) for s, r in zip(average.shadow_params, raw))
