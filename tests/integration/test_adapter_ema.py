"""--use_ema with --use_lora: an average of the adapter weights only, in the files, the samples and checkpoints."""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

import sdft.output
import train_text_to_image as t2i
from sdft.cli import run
from sdft.ema import EMA
from sdft.lora import WEIGHT_NAME
from tests.integration.conftest import sd_args
from tests.integration.test_adapter_runs import peft_merged

pytestmark = pytest.mark.integration
COMMON = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--report_to", "none", "--learning_rate", "1e-2",
          "--use_lora", "--lora_targets", "attn-mlp", "--use_ema"]


def expected_average(raw: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """diffusers' EMAModel, written out: update k mixes in the raw weights with decay min(0.9999, k/(9+k))
    for k >= 2 (1 - decay of the first update is 1: the average starts at the first step's weights)."""
    average = [w.clone() for w in raw[0]]
    for k, weights in enumerate(raw[1:], start=2):
        decay = min(0.9999, k / (9 + k))
        average = [decay * a + (1 - decay) * w for a, w in zip(average, weights)]
    return average


def test_adapter_ema_is_exported_sampled_and_resumed(tiny_sd, image_folder, tmp_path, monkeypatch):
    raw, finished = [], {}
    step, finish = EMA.step, sdft.output.finish

    def record(self, modules):
        step(self, modules)
        raw.append([p.detach().clone() for _, p in self.tracked(modules["unet"])])

    def after_finish(run_):
        finish(run_)
        unet = run_.trained.modules["unet"]
        finished.update(adapter=[p.detach().clone() for p in unet.parameters() if p.requires_grad],
                        merged=peft_merged(unet), frozen=sum(1 for p in unet.parameters() if not p.requires_grad),
                        tracked=len(run_.trained.ema.averages["unet"].shadow_params))

    monkeypatch.setattr(EMA, "step", record)
    monkeypatch.setattr(sdft.output, "finish", after_finish)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 32 --h 32 --s 1\n")    # one 1-step image per set: cheap samples
    argv = sd_args(tiny_sd, image_folder, straight, *COMMON, "--sample_prompts", prompts, "--sample_every_n_steps", "2")
    assert run(t2i.main, t2i.parse_args([str(a) for a in argv])) == 0

    # The average holds the adapter weights only, and it is what the run ends with and exports.
    assert len(raw) == 4 and finished["tracked"] == len(finished["adapter"]) < finished["frozen"]
    for got, want in zip(finished["adapter"], expected_average(raw)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert max((a - b).abs().max().item() for a, b in zip(raw[-1], finished["adapter"])) > 1e-5   # not the raw
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
    pipe.load_lora_weights(str(straight))
    pipe.fuse_lora(components=["unet"])
    pipe.unload_lora_weights()
    fused = pipe.unet.state_dict()
    assert max((fused[k] - v).abs().max().item() for k, v in finished["merged"].items()) < 1e-5

    rows = [line.split("\t") for line in (straight / "validation" / "step-000002" / "prompts.txt").read_text()
            .splitlines()]
    assert rows == [["00.png", "[EMA] a red circle"], ["00-raw.png", "[raw] a red circle"]]
    assert (straight / "checkpoint-2" / "unet_ema" / "ema.safetensors").is_file()

    resumed.mkdir()   # the average is restored with the checkpoint: 2 + 2 steps end where 4 straight did
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    argv = sd_args(tiny_sd, image_folder, resumed, *COMMON, "--resume_from_checkpoint", "latest")
    assert run(t2i.main, t2i.parse_args([str(a) for a in argv])) == 0
    a, b = load_file(str(straight / WEIGHT_NAME)), load_file(str(resumed / WEIGHT_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
