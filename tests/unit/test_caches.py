"""The disk caches on their own: text-encoder entries equal on-the-fly encoding (SDXL, SD3), latent
entries equal the VAE's posterior of the transformed image, fills split between processes without
encoding anything twice, an interrupted fill continues, and writes are atomic."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from sdft.data import cache_store
from sdft.data.cache_store import DiskStore, Job, MemoryStore
from sdft.data.dataset import CaptionedImageDataset
from sdft.data.latent_cache import VaeEncoder, fill_latent_cache, vae_identity
from sdft.data.sources import load_captioned_images
from sdft.data.text_cache import fill_text_cache, text_identity
from sdft.data.transforms import ImageTransform
from sdft.families.sd3 import StableDiffusion3
from sdft.families.sdxl import StableDiffusionXL
from sdft.families.source import ModelSource
from sdft.tiny import build_sd, build_sd3, build_sdxl, make_images

CPU = torch.device("cpu")
CAPTIONS = {"a red circle on a blue background", "a green square", ""}


def loaded(family, path: Path):
    return family, family.load(ModelSource(str(path)))


def cached_condition(family, models, folder: Path, captions: list[str], batch: dict) -> dict:
    identity = text_identity(family, models, "tiny", None, None)
    cache, result = fill_text_cache(family, models, CAPTIONS, DiskStore(folder), identity, CPU, show_progress=False)
    assert result.encoded == len(CAPTIONS)
    return family.batch_condition(cache({**batch, "captions": captions}), batch, CPU)


def test_sdxl_text_cache_gives_the_conditioning_of_encoding_on_the_fly(tmp_path):
    family, models = loaded(StableDiffusionXL(), build_sdxl(tmp_path / "sdxl"))
    captions = ["a green square", "", "a red circle on a blue background"]
    batch = {"pixel_values": torch.zeros(3, 3, 32, 32), "captions": captions,
             "original_sizes": torch.tensor([[48, 64], [32, 32], [40, 32]]),
             "crop_top_lefts": torch.tensor([[0, 5], [0, 0], [4, 0]])}
    cached = cached_condition(family, models, tmp_path / "text", captions, batch)
    with torch.no_grad():
        direct = family.condition(models, batch, CPU)
    torch.testing.assert_close(cached, direct)
    # The size/crop part is the batch's own, added per batch.
    assert cached["added_cond_kwargs"]["time_ids"][0].tolist() == [48, 64, 0, 5, 32, 32]


def test_sd3_text_cache_gives_the_conditioning_of_encoding_on_the_fly_per_sequence_length(tmp_path):
    path = build_sd3(tmp_path / "sd3")
    captions = ["a red circle on a blue background", ""]
    batch = {"captions": captions}
    names = set()
    for length in (16, 32):
        family, models = loaded(StableDiffusion3(max_sequence_length=length), path)
        cached = cached_condition(family, models, tmp_path / "text", captions, batch)
        with torch.no_grad():
            direct = family.condition(models, batch, CPU)
        torch.testing.assert_close(cached, direct)
        assert cached["encoder_hidden_states"].shape[1] == 77 + length   # CLIP tokens, then T5's
        names |= {p.name for p in (tmp_path / "text").rglob("*.safetensors")}
    assert len(names) == 2 * len(CAPTIONS), "another --max_sequence_length must not reuse the entries"


def test_latent_entries_are_the_vae_posterior_of_the_transformed_image(tmp_path):
    family_path = build_sd(tmp_path / "sd")
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(family_path, subfolder="vae")
    data = make_images(tmp_path / "images", num_images=3, layout="metadata")
    images = load_captioned_images(dataset_name=None, dataset_config_name=None, train_data_dir=str(data),
                                   image_column="image", caption_column="text", cache_dir=None,
                                   max_train_samples=None, seed=0)
    dataset = CaptionedImageDataset(images, ImageTransform(32, center_crop=False, random_flip=True), seed=0)
    cache, result = fill_latent_cache(dataset, VaeEncoder(vae, CPU), vae_identity(vae, "tiny", None, None),
                                      DiskStore(tmp_path / "latents"), show_progress=False)
    assert (result.encoded, result.reused) == (6, 0)   # 3 images and their mirror images
    dataset.latent_cache = cache
    plans = dataset.cache_image(1).plans
    with torch.no_grad():
        posteriors = [vae.encode(dataset.cache_pixels(1, plan).pixels.unsqueeze(0)).latent_dist.parameters[0]
                      for plan in plans]
    assert not torch.allclose(*posteriors), "the mirror image has its own entry"
    drawn = set()
    for epoch in range(8):
        dataset.use_epoch(epoch)
        matches = [torch.allclose(dataset[1]["latent_moments"], posterior) for posterior in posteriors]
        assert any(matches)
        drawn.add(matches[1])
    assert drawn == {False, True}, "the per-epoch draw picks either entry"
    # A second fill with the same image, VAE and transform encodes nothing.
    _, again = fill_latent_cache(dataset, VaeEncoder(vae, CPU), vae_identity(vae, "tiny", None, None),
                                 DiskStore(tmp_path / "latents"), show_progress=False)
    assert (again.encoded, again.reused) == (0, 6)


class CountingEncoder:
    """Entry = the job's source as a tensor; fails after `fail_after` entries (an interrupted fill)."""

    def __init__(self, fail_after: int | None = None):
        self.encoded: list[str] = []
        self.fail_after = fail_after

    def __call__(self, chunk: list[Job]) -> list[dict]:
        if self.fail_after is not None and len(self.encoded) >= self.fail_after:
            raise KeyboardInterrupt
        self.encoded += [job.name for job in chunk]
        return [{"value": torch.tensor([float(job.source)])} for job in chunk]


def jobs(count: int) -> list[Job]:
    return [Job(cache_store.entry_name({"i": i}), f"item {i}", i) for i in range(count)]


def test_an_interrupted_fill_continues_where_it_stopped_and_leaves_no_torn_file(tmp_path):
    store = DiskStore(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        cache_store.fill(store, jobs(10), CountingEncoder(fail_after=4), process_index=0, num_processes=1,
                         desc="", show_progress=False)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 4
    resumed = CountingEncoder()
    result = cache_store.fill(store, jobs(10), resumed, process_index=0, num_processes=1, desc="",
                              show_progress=False)
    assert (result.encoded, result.reused) == (6, 4)
    assert [store.read(job.name, job.label)["value"].item() for job in jobs(10)] == list(range(10))
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".safetensors"]


def test_processes_share_a_disk_fill_and_encode_each_entry_once(tmp_path):
    encoders = [CountingEncoder(), CountingEncoder()]
    results = {}

    def process(index: int) -> None:   # a thread stands in for each process
        results[index] = cache_store.fill(DiskStore(tmp_path), jobs(9), encoders[index], process_index=index,
                                          num_processes=2, desc="", show_progress=False)

    threads = [threading.Thread(target=process, args=(index,)) for index in (1, 0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [len(e.encoded) for e in encoders] == [5, 4]
    assert sorted(encoders[0].encoded + encoders[1].encoded) == sorted(job.name for job in jobs(9))
    assert results[0].encoded + results[1].encoded == 9


def test_memory_store_fills_everything_in_every_process():
    encoder = CountingEncoder()
    result = cache_store.fill(MemoryStore(), jobs(5), encoder, process_index=1, num_processes=2, desc="",
                              show_progress=False)
    assert result.encoded == 5


def test_an_unreadable_entry_is_encoded_again_with_a_warning_naming_it(tmp_path, caplog):
    store = DiskStore(tmp_path)
    cache_store.fill(store, jobs(3), CountingEncoder(), process_index=0, num_processes=1, desc="",
                     show_progress=False)
    broken = store.path(jobs(3)[1].name)
    broken.write_bytes(broken.read_bytes()[:20])
    again = CountingEncoder()
    with caplog.at_level("WARNING"):
        cache_store.fill(store, jobs(3), again, process_index=0, num_processes=1, desc="", show_progress=False)
    assert again.encoded == [jobs(3)[1].name]
    assert "item 1" in caplog.text and str(broken) in caplog.text
    assert store.read(jobs(3)[1].name, "item 1")["value"].item() == 1.0


def test_a_cache_folder_that_cannot_be_written_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(cache_store.DataError, match=str(blocker / "cache")):
        cache_store.prepare_folder(blocker / "cache", "--latents_cache_dir")
