"""kohya's dataset config, its folder convention and caption augmentation: what a user writes
becomes the plan kohya's docs describe, and every mistake is named by file, table and key."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import train_dreambooth_sd3 as sd3_script
import train_text_to_image as t2i
from sdft.data.captions import CaptionAugment, augment_caption, caption_parts, caption_variants
from sdft.data.dataset_config import read_dataset_config
from sdft.data.subsets import Part, epoch_items, kohya_folders, subset_images
from sdft.data.transforms import ImageTransform
from sdft.errors import DataError
from sdft.tiny import make_images

DEFAULTS = {
    "resolution": 512, "batch_size": 1, "enable_bucket": False, "min_bucket_reso": 256, "max_bucket_reso": 1024,
    "bucket_reso_steps": 64, "bucket_no_upscale": False, "num_repeats": 1, "caption_extension": None,
    "keep_tokens": 0, "keep_tokens_separator": "", "shuffle_caption": False, "caption_separator": ",",
    "secondary_separator": "", "caption_dropout_rate": 0.0, "caption_dropout_every_n_epochs": 0,
    "caption_tag_dropout_rate": 0.0, "flip_aug": False, "random_crop": True, "caption_prefix": "",
    "caption_suffix": "", "enable_wildcard": False,
}

# The example of kohya's docs/config_README-en.md, its Windows folders made relative.
KOHYA_EXAMPLE = """
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

# This is a DreamBooth-style dataset
[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = 'hoge'
  class_tokens = 'hoge girl'

  [[datasets.subsets]]
  image_dir = 'fuga'
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = 'reg'
  class_tokens = 'human'
  keep_tokens = 1

# This is a fine-tuning dataset
[[datasets]]
resolution = [768, 768]
batch_size = 2

  [[datasets.subsets]]
  image_dir = 'piyo'
  metadata_file = 'piyo/piyo_md.json'
"""


def write_config(folder: Path, text: str, name: str = "dataset.toml") -> Path:
    for sub in ("hoge", "fuga", "reg", "piyo"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "piyo" / "piyo_md.json").write_text("{}")
    path = folder / name
    path.write_text(text)
    return path


def test_the_kohya_docs_example_parses_into_the_plan_its_docs_describe(tmp_path):
    config = read_dataset_config(write_config(tmp_path, KOHYA_EXAMPLE), DEFAULTS)
    first, second = config.datasets
    assert (first.resolution, first.batch_size, second.resolution, second.batch_size) == (512, 4, 768, 2)
    assert [s.image_dir for s in first.subsets] == [tmp_path / "hoge", tmp_path / "fuga", tmp_path / "reg"]
    # keep_tokens: the subset's own, else its dataset's, else [general]'s (the docs' comments).
    assert [s.captions.keep_tokens for s in (*first.subsets, *second.subsets)] == [2, 3, 1, 1]
    assert all(s.captions.shuffle and s.caption_extension == ".txt" for s in (*first.subsets, *second.subsets))
    assert [s.is_reg for s in first.subsets] == [False, False, True]
    assert [s.class_tokens for s in first.subsets] == ["hoge girl", "fuga boy", "human"]
    assert second.subsets[0].metadata_file == tmp_path / "piyo" / "piyo_md.json"
    assert second.subsets[0].where == "datasets[1].subsets[0]"


@pytest.mark.parametrize("edit, table, key, words", [
    (("num_repeats = 1", "num_repeat = 1"), "datasets[0].subsets[1]", "num_repeat", "did you mean 'num_repeats'"),
    (("num_repeats = 1", "num_repeats = '3'"), "datasets[0].subsets[1]", "num_repeats", "must be an integer"),
    (("image_dir = 'b'", "class_tokens = 'x'"), "datasets[0].subsets[1]", "image_dir", "missing"),
    (("image_dir = 'b'", "image_dir = 'nowhere'"), "datasets[0].subsets[1]", "image_dir", "is not a folder"),
    (("num_repeats = 1", "color_aug = true"), "datasets[0].subsets[1]", "color_aug", "kohya key not supported yet"),
    (("num_repeats = 1", "resolution = 512"), "datasets[0].subsets[1]", "resolution", "is a dataset key"),
    (("batch_size = 2", "batch_size = 2\nimage_dir = 'a'"), "datasets[0]", "image_dir", "only be set in"),
    (("batch_size = 2", "batch_size = 0"), "datasets[0]", "batch_size", "at least 1"),
    (("batch_size = 2", "batch_size = 2\nresolution = 500"), "datasets[0]", "resolution", "multiple of 8"),
    (("batch_size = 2", "batch_size = 2\nresolution = [512, 768]"), "datasets[0]", "resolution", "square"),
    (("num_repeats = 1", "caption_dropout_rate = 1.5"), "datasets[0].subsets[1]", "caption_dropout_rate",
     "between 0 and 1"),
])
def test_a_bad_key_is_named_with_its_file_and_table(tmp_path, edit, table, key, words):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    text = ("[general]\nshuffle_caption = true\n[[datasets]]\nbatch_size = 2\n"
            "[[datasets.subsets]]\nimage_dir = 'a'\n[[datasets.subsets]]\nimage_dir = 'b'\nnum_repeats = 1\n")
    path = tmp_path / "bad.toml"
    path.write_text(text.replace(*edit))
    with pytest.raises(DataError) as err:
        read_dataset_config(path, DEFAULTS)
    message = str(err.value)
    assert str(path) in message and table in message and f"'{key}'" in message and words in message, message


def test_a_kohya_key_at_its_default_changes_nothing_and_is_accepted(tmp_path):
    (tmp_path / "a").mkdir()
    path = tmp_path / "ok.toml"
    path.write_text("[general]\ncolor_aug = false\ncache_info = false\n[[datasets]]\n[[datasets.subsets]]\n"
                    "image_dir = 'a'\n")
    assert read_dataset_config(path, DEFAULTS).datasets[0].subsets[0].image_dir == tmp_path / "a"


def test_a_toml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[general]\nshuffle_caption = true\nkeep_tokens = \n")
    with pytest.raises(DataError, match=r"broken\.toml is not valid TOML: .*line 3"):
        read_dataset_config(path, DEFAULTS)


def test_a_json_config_reads_like_toml(tmp_path):
    (tmp_path / "a").mkdir()
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"datasets": [{"resolution": 256, "subsets": [{"image_dir": "a", "num_repeats": 3}]}]}))
    spec = read_dataset_config(path, DEFAULTS).datasets[0]
    assert (spec.resolution, spec.subsets[0].num_repeats) == (256, 3)


# --------------------------------------------------------------------------- captions


def test_shuffle_keeps_the_first_tags_and_shuffles_the_rest_as_random_does():
    """Closed form: with keep_tokens 1 the output is the first tag, then the others in the order
    random.shuffle gives for the same seed (the function's documented draws)."""
    caption = "sks dog, red collar, grass, sunny, running"
    settings = CaptionAugment(shuffle=True, keep_tokens=1)
    rest = ["red collar", "grass", "sunny", "running"]
    random.Random(7).shuffle(rest)
    assert augment_caption(caption, settings, 0, random.Random(7)) == ", ".join(["sks dog", *rest])
    seen = {augment_caption(caption, settings, 0, random.Random(seed)) for seed in range(50)}
    assert len(seen) > 5 and all(s.startswith("sks dog, ") for s in seen)
    assert all(sorted(s.split(", ")) == sorted(caption.split(", ")) for s in seen)


def test_keep_tokens_separator_fixes_a_head_and_a_tail_as_kohyas_docs_say():
    caption = "1girl, hatsune miku, vocaloid ||| stage, microphone, white shirt ||| best quality, rating: general"
    settings = CaptionAugment(shuffle=True, keep_tokens_separator="|||")
    assert caption_parts(caption, settings) == (["1girl", "hatsune miku", "vocaloid"],
                                                ["stage", "microphone", "white shirt"],
                                                ["best quality", "rating: general"])
    out = augment_caption(caption, settings, 0, random.Random(1)).split(", ")
    assert out[:3] == ["1girl", "hatsune miku", "vocaloid"] and out[-2:] == ["best quality", "rating: general"]


def test_secondary_separator_moves_as_one_tag_and_becomes_the_separator():
    settings = CaptionAugment(shuffle=True, secondary_separator=";;;")
    out = augment_caption("a, sky;;;cloud;;;day, b", settings, 0, random.Random(3))
    assert "sky,cloud,day" in out.split(", ") and ";;;" not in out


def test_tag_dropout_and_caption_dropout_follow_their_rates():
    caption = ", ".join(f"tag{i}" for i in range(20))
    drop_all = CaptionAugment(tag_dropout_rate=1.0, keep_tokens=2)
    assert augment_caption(caption, drop_all, 0, random.Random(0)) == "tag0, tag1"
    half = [augment_caption(caption, CaptionAugment(dropout_rate=0.5), 0, random.Random(s)) for s in range(400)]
    assert 150 < half.count("") < 250 and set(half) == {"", caption}
    every_third = CaptionAugment(dropout_every_n_epochs=3)
    assert [augment_caption(caption, every_third, e, random.Random(0)) == "" for e in range(6)] == [
        False, False, True, False, False, True]   # epochs 3 and 6, counting from 1 as kohya does


def test_caption_variants_are_known_unless_tags_move():
    assert caption_variants({"a, b"}, CaptionAugment(dropout_rate=0.1)) == {"a, b", ""}
    assert caption_variants({"a, b"}, CaptionAugment(shuffle=True)) is None
    assert caption_variants({"a ||| b"}, CaptionAugment(keep_tokens_separator="|||")) == {"a, b"}


# --------------------------------------------------------------------------- repeats and folders


def part(images, repeats: int, is_reg: bool = False) -> Part:
    return Part("s", images, repeats, CaptionAugment(), ImageTransform(32, False, False), None, 2, 0, is_reg)


def test_an_epoch_counts_images_times_repeats_and_reg_matches_the_training_items(tmp_path):
    a = subset_images(make_images(tmp_path / "a", num_images=3, layout="captions"), None, None, None, None, "a")
    b = subset_images(make_images(tmp_path / "b", num_images=2, layout="captions"), None, None, None, None, "b")
    reg = subset_images(make_images(tmp_path / "r", num_images=4, layout="images"), None, "dog", None, None, "r")
    items = epoch_items([part(a, 2), part(b, 1), part(reg, 1, is_reg=True)])
    assert len(items) == (3 * 2 + 2 * 1) * 2          # kohya: as many reg items as training items
    assert [p for p, _ in items].count(0) == 6 and [p for p, _ in items].count(1) == 2
    assert [row for p, row in items if p == 2] == [0, 1, 2, 3, 0, 1, 2, 3]   # round-robin
    assert reg.captions(0) == ["dog"]


def test_kohya_folders_give_repeats_and_class_tokens(tmp_path):
    root = tmp_path / "train"
    make_images(root / "10_sks dog", num_images=2, layout="images")
    make_images(root / "1_dog", num_images=3, layout="captions")
    assert kohya_folders(root) == [(root / "10_sks dog", 10, "sks dog"), (root / "1_dog", 1, "dog")]
    assert kohya_folders(root / "1_dog") is None          # images in it: an ordinary folder
    make_images(root / "extra", num_images=1, layout="images")
    assert kohya_folders(root) is None                    # not every sub-folder is N_name


def test_a_kohya_folder_with_zero_repeats_is_an_error(tmp_path):
    make_images(tmp_path / "0_dog", num_images=1, layout="images")
    with pytest.raises(DataError, match="0_dog.*N must be at least 1"):
        kohya_folders(tmp_path)


def test_an_image_without_caption_or_class_tokens_is_named(tmp_path):
    folder = make_images(tmp_path / "a", num_images=2, layout="images")
    with pytest.raises(DataError, match=r"datasets\[0\]\.subsets\[0\]: 2 image\(s\).*class_tokens"):
        subset_images(folder, None, None, None, None, "datasets[0].subsets[0]")


# --------------------------------------------------------------------------- the command line


def test_dataset_config_is_exclusive_with_the_data_flags(tmp_path, capsys):
    path = write_config(tmp_path, KOHYA_EXAMPLE)
    with pytest.raises(SystemExit):
        t2i.parse_args(["--pretrained_model_name_or_path", "org/model", "--dataset_config", str(path),
                        "--train_data_dir", str(tmp_path)])
    assert "--dataset_config replaces --train_data_dir" in capsys.readouterr().err


def test_a_bad_config_stops_the_parse_with_file_table_and_key(tmp_path, capsys):
    path = write_config(tmp_path, KOHYA_EXAMPLE.replace("keep_tokens = 3", "keep_token = 3"))
    with pytest.raises(SystemExit):
        sd3_script.parse_args(["--pretrained_model_name_or_path", "org/model", "--dataset_config", str(path),
                               "--instance_prompt", "a photo"])
    err = capsys.readouterr().err
    assert str(path) in err and "datasets[0].subsets[1]" in err and "'keep_token'" in err, err


def test_reg_items_carry_the_prior_loss_weight_into_the_batch_loss(tmp_path):
    from sdft.data.subsets import SubsetDataset
    from sdft.trainer import reduce_loss

    train = subset_images(make_images(tmp_path / "a", num_images=2, layout="captions", size=32), None, None, None,
                          None, "a")
    reg = subset_images(make_images(tmp_path / "r", num_images=1, layout="images", size=32), None, "dog", None, None,
                        "r")
    dataset = SubsetDataset([part(train, 1), part(reg, 1, is_reg=True)], seed=0, reg_weight=0.25)
    batch = dataset.collate([dataset[i] for i in range(len(dataset))])
    assert batch["loss_weights"].tolist() == [1.0, 1.0, 0.25, 0.25] and batch["captions"][2:] == ["dog", "dog"]
    per_sample = torch.tensor([1.0, 2.0, 4.0, 8.0])
    assert reduce_loss(per_sample, batch, None).item() == pytest.approx((1 + 2 + 0.25 * 4 + 0.25 * 8) / 4)


def test_batches_never_mix_datasets_and_use_each_datasets_batch_size(tmp_path):
    from sdft.data.buckets import BucketBatchSampler
    from sdft.data.subsets import SubsetDataset

    images = subset_images(make_images(tmp_path / "a", num_images=5, layout="captions", size=32), None, None, None,
                           None, "a")
    low = Part("low", images, 1, CaptionAugment(), ImageTransform(32, False, False), None, 2, 0)
    high = Part("high", images, 2, CaptionAugment(), ImageTransform(64, False, False), None, 3, 1)
    dataset = SubsetDataset([low, high], seed=0)
    keys, sizes = dataset.batch_plan()
    sampler = BucketBatchSampler(keys, 99, seed=0, batch_sizes=sizes)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3 + 4          # ceil(5 / 2) + ceil(10 / 3)
    assert sorted(i for batch in batches for i in batch) == list(range(15))
    for batch in batches:
        assert len({keys[i] for i in batch}) == 1
        assert len(batch) <= (2 if keys[batch[0]][0] == 0 else 3)
    shapes = {tuple(dataset[i]["pixel_values"].shape[-2:]) for i in (0, 5)}
    assert shapes == {(32, 32), (64, 64)}


def test_n_name_folders_give_the_same_epoch_as_the_equivalent_toml(tmp_path, accelerator):
    from sdft.builders import config_data, text_image_data

    root = tmp_path / "train"
    make_images(root / "3_sks dog", num_images=2, layout="images", size=32)
    make_images(root / "1_cat", num_images=3, layout="captions", size=32)
    path = tmp_path / "same.toml"
    path.write_text(f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{root / '3_sks dog'}'\nnum_repeats = 3\n"
                    f"class_tokens = 'sks dog'\n[[datasets.subsets]]\nimage_dir = '{root / '1_cat'}'\n"
                    "class_tokens = 'cat'\n")
    common = ["--pretrained_model_name_or_path", "org/model", "--resolution", "32", "--output_dir", str(tmp_path / "o")]
    folders = text_image_data(t2i.parse_args([*common, "--train_data_dir", str(root)]), 0, accelerator, None)
    config = config_data(t2i.parse_args([*common, "--dataset_config", str(path)]), 0, accelerator, None)
    assert len(folders) == len(config) == 3 * 2 + 3

    def epoch(dataset):
        return sorted((dataset.parts[p].images.describe(row), dataset.parts[p].images.captions(row)[0])
                      for p, row in dataset.items)

    assert epoch(folders) == epoch(config)
    assert sum(caption == "sks dog" for _, caption in epoch(folders)) == 6


def test_the_planned_caption_variants_are_exactly_the_captions_the_items_show(tmp_path):
    from sdft.data.captions import planned_variants
    from sdft.data.subsets import SubsetDataset

    folder = make_images(tmp_path / "a", num_images=3, layout="captions", size=32)
    for index, caption in enumerate(sorted(folder.glob("*.txt"))):
        caption.write_text(f"sks, tag{index}, red, blue, green")
    images = subset_images(folder, None, None, None, None, "a")
    settings = CaptionAugment(shuffle=True, keep_tokens=1, tag_dropout_rate=0.3, dropout_rate=0.2)
    dataset = SubsetDataset([Part("a", images, 2, settings, ImageTransform(32, False, True), None, 2, 0)], seed=5)
    shown = set()
    for epoch in range(3):
        dataset.use_epoch(epoch)
        shown |= {dataset[i]["caption"] for i in range(len(dataset))}
    assert planned_variants(dataset.caption_items(), 5, 3) == shown and "" in shown and len(shown) > 10
    assert planned_variants(dataset.caption_items(), 5, 3, limit=5) is None


def test_reg_data_dir_folders_are_regularisation_subsets_weighted_by_prior_loss_weight(tmp_path, accelerator):
    from sdft.builders import text_image_data

    make_images(tmp_path / "train" / "5_sks dog", num_images=2, layout="images", size=32)
    make_images(tmp_path / "reg" / "1_dog", num_images=3, layout="images", size=32)
    args = t2i.parse_args(["--pretrained_model_name_or_path", "org/model", "--resolution", "32", "--output_dir",
                           str(tmp_path / "o"), "--train_data_dir", str(tmp_path / "train"), "--reg_data_dir",
                           str(tmp_path / "reg"), "--prior_loss_weight", "0.5"])
    dataset = text_image_data(args, 0, accelerator, None)
    assert len(dataset) == 10 * 2                         # 2 x 5 training items, as many reg items
    weights = [dataset[i]["loss_weight"] for i in range(len(dataset))]
    assert weights == [1.0] * 10 + [0.5] * 10
    assert dataset[10]["caption"] == "dog" and dataset[0]["caption"] == "sks dog"


def test_keep_tokens_covering_a_whole_caption_is_a_warning_naming_the_image(tmp_path, caplog):
    from sdft.data.subsets import SubsetDataset, log_epoch

    folder = make_images(tmp_path / "a", num_images=2, layout="captions", size=32)
    first, second = sorted(folder.glob("*.txt"))
    first.write_text("sks, red")
    second.write_text("sks, red, circle, blue")
    images = subset_images(folder, None, None, None, None, "a")
    settings = CaptionAugment(shuffle=True, keep_tokens=2)
    with caplog.at_level("WARNING"):
        log_epoch(SubsetDataset([Part("datasets[0].subsets[0]", images, 1, settings,
                                      ImageTransform(32, False, False), None, 1, 0)], seed=0))
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "datasets[0].subsets[0]: keep_tokens 2 keeps every tag of 1 caption(s)" in warning
    assert first.with_suffix(".png").name in warning and second.with_suffix(".png").name not in warning


def test_dry_run_prints_the_epoch_and_loads_no_model(tmp_path, monkeypatch, capsys, fresh_accelerate_state):
    import sdft.builders
    from sdft.cli import run

    folder = make_images(tmp_path / "a", num_images=3, layout="captions", size=32)
    for caption in folder.glob("*.txt"):
        caption.write_text("sks, red, circle, blue")
    path = tmp_path / "d.toml"
    path.write_text("[[datasets]]\nresolution = 32\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = 'a'\n"
                    "num_repeats = 2\nshuffle_caption = true\nkeep_tokens = 1\n")

    def no_model(*_args, **_kwargs):
        raise AssertionError("--dry_run loaded a model")

    monkeypatch.setattr(sdft.builders, "load_models", no_model)
    args = t2i.parse_args(["--pretrained_model_name_or_path", "org/model", "--dataset_config", str(path),
                           "--output_dir", str(tmp_path / "o"), "--dry_run", "--max_train_steps", "9",
                           "--report_to", "none"])
    assert run(t2i.main, args) == 0
    out = capsys.readouterr().out
    assert "Items per epoch: 6; batches per epoch: 3; optimizer steps per epoch: 3 (one process); epochs: 3" in out
    assert "datasets[0].subsets[0]: 3 images x 2 repeats, 32px, batch 2" in out
    examples = out.split("Example captions of epoch 0:\n")[1].splitlines()[:3]
    assert all(line.strip().startswith("'sks, ") for line in examples), examples
    assert "caption variants for 3 epoch(s)" in out


def test_prefix_suffix_and_wildcards_as_kohyas_docs_example():
    """The docs' example: a prefix ending in '|||' and a suffix holding one are fixed head and tail."""
    settings = CaptionAugment(shuffle=True, keep_tokens_separator="|||", prefix="1girl, hatsune miku, vocaloid |||",
                              suffix=", anime screencap ||| masterpiece, rating: general")
    out = augment_caption("stage, microphone, white shirt", settings, 0, random.Random(2)).split(", ")
    assert out[:3] == ["1girl", "hatsune miku", "vocaloid"] and out[-2:] == ["masterpiece", "rating: general"]
    assert sorted(out[3:-2]) == sorted(["stage", "microphone", "white shirt", "anime screencap"])
    wild = CaptionAugment(wildcard=True)
    seen = {augment_caption("a {simple|white} background, {{retro}}\nsecond line", wild, 0, random.Random(s))
            for s in range(40)}
    assert seen == {"a simple background, {retro}", "a white background, {retro}", "second line"}
    assert caption_variants({"x"}, CaptionAugment(prefix="p, ")) == {"p, x"}


def test_dry_run_with_prior_preservation_generates_no_class_image(tmp_path, monkeypatch, capsys,
                                                                  fresh_accelerate_state):
    import sdft.builders
    from sdft.cli import run

    def no_model(*_args, **_kwargs):
        raise AssertionError("--dry_run loaded a model")

    monkeypatch.setattr(sdft.builders, "load_models", no_model)
    monkeypatch.setattr(sdft.builders, "generate_class_images", no_model)
    instance = make_images(tmp_path / "dog", num_images=2, layout="images", size=32)
    args = sd3_script.parse_args(["--pretrained_model_name_or_path", "org/model", "--instance_data_dir", str(instance),
                                  "--instance_prompt", "a photo of sks dog", "--with_prior_preservation",
                                  "--class_data_dir", str(tmp_path / "class"), "--class_prompt", "a photo of dog",
                                  "--output_dir", str(tmp_path / "o"), "--dry_run", "--caption_dropout_rate", "0.5",
                                  "--report_to", "none"])
    assert run(sd3_script.main, args) == 0
    out = capsys.readouterr().out
    assert "Items per epoch: 2" in out and "caption variants" in out
