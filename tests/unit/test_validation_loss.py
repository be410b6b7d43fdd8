"""The validation loss on held-out images: the split, its fixed draws, the flags and the model card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

import train_dreambooth_sd3 as sd3_script
import train_text_to_image as t2i
from sdft.builders import ddpm_objective, dreambooth_data, text_image_data
from sdft.data.dataset import CaptionedImageDataset
from sdft.data.held_out import split_held_out
from sdft.data.sources import DataError, load_captioned_images
from sdft.data.transforms import ImageTransform
from sdft.families.sd import StableDiffusion
from sdft.families.source import ModelSource
from sdft.hub import CardInfo, write_model_card
from sdft.tiny import build_sd, make_images
from sdft.validation_loss import ValidationLoss
from tests.unit.test_cli_errors import parse_error


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("val") / "images", num_images=8, layout="captions")


@pytest.fixture(scope="module")
def images(folder, tmp_path_factory):
    return load_captioned_images(dataset_name=None, dataset_config_name=None, train_data_dir=str(folder),
                                 image_column="image", caption_column="text",
                                 cache_dir=str(tmp_path_factory.mktemp("hf")), max_train_samples=None, seed=0)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_sd(tmp_path_factory.mktemp("model") / "tiny-sd")


def names(images) -> list[str]:
    return [images.name(i) for i in range(len(images))]


def test_split_is_disjoint_seeded_and_keeps_at_least_one(images):
    train, held = split_held_out(images, 0.25, seed=3)
    assert len(train) == 6 and len(held) == 2
    assert sorted(names(train) + names(held)) == sorted(names(images))
    assert names(split_held_out(images, 0.25, seed=3)[1]) == names(held)
    assert any(names(split_held_out(images, 0.25, seed=s)[1]) != names(held) for s in range(4, 10))
    assert len(split_held_out(images, 0.01, seed=0)[1]) == 1
    assert split_held_out(images, 0.0, seed=0) == (images, None)
    one_image = split_held_out(images, 0.125, seed=0)[1]
    with pytest.raises(DataError, match="--validation_split 0.5 of 1 image"):
        split_held_out(one_image, 0.5, seed=0)


@pytest.fixture()
def model_stub(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    stub = tmp_path / "model"
    stub.mkdir()
    (stub / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return stub


def test_held_out_images_are_never_in_the_training_data(model_stub, folder):
    args = t2i.parse_args([f"--pretrained_model_name_or_path={model_stub}", f"--train_data_dir={folder}",
                           "--validation_split=0.25", "--validation_seed=5", "--resolution=32"])
    dataset = text_image_data(args, seed=0, accelerator=None, family=None)
    trained, held = names(dataset.images), names(dataset.held_out.images)
    assert len(held) == 2 and not set(trained) & set(held) and len(trained) == 6
    assert dataset.held_out.seed == 5 and dataset.held_out.empty_caption_rate == 0


def test_dreambooth_holds_out_instance_images_or_reads_a_folder(model_stub, tmp_path):
    dog = make_images(tmp_path / "dog", num_images=5, layout="images")
    other = make_images(tmp_path / "other", num_images=2, layout="images")
    base = [f"--pretrained_model_name_or_path={model_stub}", f"--instance_data_dir={dog}",
            "--instance_prompt=a photo of sks dog", "--resolution=32"]
    split = dreambooth_data(sd3_script.parse_args(base + ["--validation_split=0.2"]), 0, None, None)
    assert len(split) == 4 and len(split.held_out) == 1
    assert not set(names(split.instance)) & set(names(split.held_out.instance))
    given = dreambooth_data(sd3_script.parse_args(base + [f"--validation_data_dir={other}"]), 0, None, None)
    assert len(given) == 5 and len(given.held_out) == 2
    assert given.held_out[0]["caption"] == "a photo of sks dog" and "class_caption" not in given.held_out[0]


def held_out_loss(model: Path, images, accelerator: Accelerator):
    family = StableDiffusion()
    models = family.load(ModelSource(str(model)))
    args = t2i.parse_args([f"--pretrained_model_name_or_path={model}", "--train_data_dir=.", "--resolution=32"])
    objective = ddpm_objective(args, models.noise_scheduler, accelerator.device)
    dataset = CaptionedImageDataset(images, ImageTransform(32, False, True), seed=1)
    return ValidationLoss(dataset, 3, seed=1, every_n_steps=2, family=family, objective=objective,
                          weight_dtype=torch.float32, offloaded=["text_encoder"]), models


@pytest.fixture()
def one_thread():
    # Tiny models run fastest on one thread; several oversubscribe the shared cores (10x slower).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_val_loss_uses_fixed_draws_and_leaves_every_rng_alone(model, images, accelerator, tmp_path, monkeypatch,
                                                              one_thread):
    monkeypatch.chdir(tmp_path)
    val, models = held_out_loss(model, images, accelerator)
    models.text_encoder.to("cpu")
    models.unet.train()   # as prepare_models leaves it
    state = torch.get_rng_state()
    def mean(share=(0, 1)):
        total, count = val.compute(models, models.unet, accelerator.device, accelerator.autocast, share)
        return (total / count).item()

    first, second = mean(), mean()
    assert first == second and torch.isfinite(torch.tensor(first))
    # Two processes' shares of the batches add up to one process's sums (sdft.validation_loss.evaluate).
    halves = [val.compute(models, models.unet, accelerator.device, accelerator.autocast, (rank, 2)) for rank in (0, 1)]
    assert all(count > 0 for _, count in halves)
    assert (sum(t for t, _ in halves) / sum(c for _, c in halves)).item() == pytest.approx(first, rel=1e-12)
    assert torch.equal(torch.get_rng_state(), state), "val_loss consumed the global RNG"
    assert models.unet.training, "the denoiser must be back in training mode"
    with torch.no_grad():
        next(models.unet.parameters()).add_(0.5)
    assert mean() != first
    assert val.evaluate(accelerator, models, models.unet, step=4) is not None and val.best[1] == 4
    assert [val.due(s, False) for s in (1, 2, 3, 4)] == [False, True, False, True] and not val.due(2, True)
    val.save_best(None, None, str(tmp_path))
    resumed, _ = held_out_loss(model, images, accelerator)
    resumed.load_best(None, str(tmp_path))
    assert resumed.best == val.best
    resumed.load_best(None, str(tmp_path / "no-such-checkpoint"))
    assert resumed.best == val.best


def test_model_card_records_the_best_val_loss(tmp_path):
    info = CardInfo(base_model="some/model", title="t", license="mit", tags=[], lora=False,
                    pipeline_class="StableDiffusionPipeline", best_val_loss=(0.123456, 40))
    text = write_model_card(tmp_path, info).read_text()
    assert "Best validation loss on held-out images: 0.123456 at step 40." in text


@pytest.mark.parametrize("extra, message", [
    (["--validation_split=1.0"], "--validation_split must be at least 0 and below 1"),
    (["--validation_split=0.2", "--validation_data_dir=."], "--validation_split or --validation_data_dir"),
    (["--validation_data_dir=missing"], "--validation_data_dir 'missing' is not a folder"),
    (["--validate_every_n_steps=5"], "--validate_every_n_steps needs held-out images"),
    (["--validation_split=0.2", "--validate_every_n_steps=0"], "--validate_every_n_steps must be at least 1"),
])
def test_bad_validation_loss_flags_name_the_flag(model_stub, folder, capsys, extra, message):
    argv = [f"--pretrained_model_name_or_path={model_stub}", f"--train_data_dir={folder}", *extra]
    assert message in parse_error(argv, capsys)


def test_image_validation_flags_are_unchanged(model_stub, folder):
    args = t2i.parse_args([f"--pretrained_model_name_or_path={model_stub}", f"--train_data_dir={folder}",
                           "--validation_prompts", "a", "b", "--validation_epochs=2", "--validation_split=0.25"])
    assert (args.validation_prompts, args.validation_epochs, args.validation_split) == (["a", "b"], 2, 0.25)
