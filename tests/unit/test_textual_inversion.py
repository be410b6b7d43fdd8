"""Pivotal tuning / textual inversion: token naming, prompt rewriting, the rows that train and the
rows that must not move, and the command-line checks of the SD 1.x and SDXL scripts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import train_dreambooth_sd3 as sd3
import train_text_to_image as t2i
import train_text_to_image_sdxl as sdxl
from sdft.errors import CliError
from sdft.families.sdxl import StableDiffusionXL
from sdft.families.source import ModelSource
from sdft.textual_inversion import TokenPlan, build_token_embeddings, check_abstractions_used, stop_step
from tests.unit.test_cli_errors import parse_error, workdir  # noqa: F401  (fixture)


def load_sdxl(path: Path):
    return StableDiffusionXL().load(ModelSource(str(path)))


# --------------------------------------------------------------------------- tokens and prompts


def test_each_abstraction_gets_its_own_numbered_tokens():
    plan = TokenPlan.from_flags("TOK, DOG", 2)
    assert plan.abstractions == {"TOK": ["<s0>", "<s1>"], "DOG": ["<s2>", "<s3>"]}
    assert plan.tokens == ["<s0>", "<s1>", "<s2>", "<s3>"]
    assert plan.apply("a photo of TOK with DOG") == "a photo of <s0><s1> with <s2><s3>"


def test_an_abstraction_inside_another_is_replaced_longest_first():
    plan = TokenPlan.from_flags("TOK,TOK2", 1)
    assert plan.apply("TOK2 and TOK") == "<s1> and <s0>"


def test_an_abstraction_in_no_text_is_an_error_naming_it():
    plan = TokenPlan.from_flags("TOK,ZZZ", 1)
    check_abstractions_used(TokenPlan.from_flags("TOK", 1), ["a photo of TOK dog"])
    with pytest.raises(CliError, match="--token_abstraction ZZZ"):
        check_abstractions_used(plan, ["a photo of TOK dog"])


def test_the_phase_ends_after_the_fraction_of_steps():
    assert stop_step(0.5, 4, train_denoiser=True) == 2
    assert stop_step(0.29, 100, train_denoiser=True) == 29
    assert stop_step(0.01, 10, train_denoiser=True) == 1
    assert stop_step(0.5, 4, train_denoiser=False) == 4   # plain textual inversion trains throughout


# --------------------------------------------------------------------------- rows


def test_only_the_new_rows_move_under_adamw_with_weight_decay(tiny_sdxl, accelerator):
    models = load_sdxl(tiny_sdxl)
    base = {role: getattr(models, role).get_input_embeddings().weight.detach().clone()
            for role in ("text_encoder", "text_encoder_2")}
    for module in (models.text_encoder, models.text_encoder_2):
        module.requires_grad_(False)
    plan = TokenPlan.from_flags("TOK", 2)
    embeddings = build_token_embeddings(StableDiffusionXL(), models, plan, seed=0, initializer_concept=None)
    for encoder in embeddings.encoders:
        assert encoder.rows().std().item() == pytest.approx(encoder.base_std, rel=0.6)
    start = {e.role: e.rows().clone() for e in embeddings.encoders}
    optimizer = torch.optim.AdamW(embeddings.params(), lr=0.1, weight_decay=0.5)

    caption = plan.apply("a photo of TOK red circle")
    hidden = StableDiffusionXL().encode_text(models, [caption], torch.device("cpu"))["encoder_hidden_states"]
    loss = hidden.pow(2).mean()
    loss.backward()
    embeddings.prepare_gradients(accelerator)
    optimizer.step()
    moved_elsewhere = any(not torch.equal(e.weight[: len(base[e.role])], base[e.role]) for e in embeddings.encoders)
    assert moved_elsewhere, "weight decay moves rows with zero gradient; the restore is what keeps them"
    embeddings.restore()

    for encoder in embeddings.encoders:
        table = encoder.weight.detach()
        old_rows = len(base[encoder.role])
        assert encoder.ids == list(range(old_rows, old_rows + 2))
        assert torch.equal(table[:old_rows], base[encoder.role]), f"{encoder.role}: a base row changed"
        assert not torch.equal(encoder.rows(), start[encoder.role]), f"{encoder.role}: the new rows did not train"
    assert models.tokenizer.tokenize(caption)[3:5] == ["<s0>", "<s1>"]
    assert models.tokenizer_2.tokenize(caption)[3:5] == ["<s0>", "<s1>"]


def test_initializer_concept_copies_the_concept_rows(tiny_sdxl):
    models = load_sdxl(tiny_sdxl)
    concept = models.tokenizer.encode("dog", add_special_tokens=False)
    expected = models.text_encoder.get_input_embeddings().weight[concept[0]].detach().clone()
    embeddings = build_token_embeddings(StableDiffusionXL(), models, TokenPlan.from_flags("TOK", 2), seed=0,
                                        initializer_concept="dog")
    rows = embeddings.encoders[0].rows()
    assert len(concept) == 1 and torch.equal(rows[0], expected) and torch.equal(rows[1], expected)


def test_a_new_token_already_in_the_tokenizer_is_an_error_naming_it(tiny_sdxl):
    models = load_sdxl(tiny_sdxl)
    models.tokenizer_2.add_tokens(["<s1>"])
    with pytest.raises(CliError, match="<s1>.*tokenizer_2"):
        build_token_embeddings(StableDiffusionXL(), models, TokenPlan.from_flags("TOK", 2), seed=0,
                               initializer_concept=None)


# --------------------------------------------------------------------------- command lines


@pytest.fixture()
def db_base(workdir: Path) -> list[str]:
    from sdft.tiny import make_images

    model = workdir / "base-model"
    model.mkdir()
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    images = make_images(workdir / "dog", num_images=2, layout="images")
    return [f"--pretrained_model_name_or_path={model}", f"--instance_data_dir={images}",
            "--instance_prompt=a photo of TOK dog"]


@pytest.mark.parametrize("script", [t2i, sdxl])
def test_dreambooth_and_pivotal_command_lines_parse(db_base, script):
    args = script.parse_args([*db_base, "--train_text_encoder_ti", "--with_prior_preservation",
                              "--class_data_dir=dogs", "--class_prompt=a photo of dog", "--num_class_images=3"])
    assert args.train_text_encoder_ti and args.token_abstraction == "TOK" and args.train_unet is True
    assert args.train_data_dir is None and args.instance_prompt == "a photo of TOK dog"
    plain = script.parse_args([db_base[0], "--train_data_dir", db_base[1].split("=", 1)[1]])
    assert plain.instance_prompt is None and plain.instance_data_dir is None, "DreamBooth flags stay optional"


@pytest.mark.parametrize("script", [t2i, sdxl])
@pytest.mark.parametrize("extra, flag", [
    (["--train_text_encoder_ti", "--token_abstraction=ZZZ"], "--token_abstraction ZZZ"),
    (["--train_text_encoder_ti", "--train_text_encoder_ti_frac=0"], "--train_text_encoder_ti_frac"),
    (["--train_text_encoder_ti", "--num_new_tokens_per_abstraction=0"], "--num_new_tokens_per_abstraction"),
    (["--train_text_encoder_ti", "--token_abstraction=TOK,TOK"], "--token_abstraction"),
    (["--train_unet=false"], "--train_text_encoder_ti"),
    (["--train_text_encoder_ti", "--train_unet=false", "--use_lora"], "--use_lora"),
    (["--token_abstraction=TOK"], "--train_text_encoder_ti"),
    (["--train_data_dir=."], "--instance_data_dir"),
])
def test_bad_pivotal_and_dreambooth_flags(db_base, capsys, script, extra, flag):
    assert flag in parse_error([*db_base, *extra], capsys, script)


def test_ti_with_text_encoder_lora_is_refused_as_upstream(db_base, capsys):
    err = parse_error([*db_base, "--train_text_encoder_ti", "--use_lora", "--train_text_encoder"], capsys, sdxl)
    assert "--train_text_encoder_ti cannot be combined with --train_text_encoder" in err


@pytest.mark.parametrize("script", [t2i, sdxl])
def test_dreambooth_flags_need_instance_data(db_base, capsys, script):
    data = db_base[1].split("=", 1)[1]
    err = parse_error([db_base[0], f"--train_data_dir={data}", "--with_prior_preservation"], capsys, script)
    assert "--with_prior_preservation" in err and "--instance_data_dir" in err
    err = parse_error([db_base[0], f"--instance_data_dir={data}"], capsys, script)
    assert "--instance_prompt" in err


def test_sd3_still_requires_instance_prompt(db_base, capsys):
    parse_error([db_base[0], db_base[1]], capsys, sd3)
