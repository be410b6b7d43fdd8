"""Seconds per image of the subject preprocessing models (captioning, upscaling, masking).

Two measurements, both offline:

- `--tiny`: the tiny random BLIP, Swin2SR and CLIPSeg of `sdft.tiny`, timed through the classes
  the trainer uses (`sdft.data.preprocess.*`) on the CPU. This times our code path and the
  libraries' overhead, not the real models' compute.
- `--real-shapes`: the real models' architectures (configs written out below from their Hub
  config.json files) built on PyTorch's meta device, so nothing is allocated: exact parameter
  counts, and FLOPs per image counted by `torch.utils.flop_counter.FlopCounterMode` for one
  forward pass at the real input size. Seconds per image then follow from a device's throughput.

    python benchmarks/bench_preprocess.py --tiny --images 8
    python benchmarks/bench_preprocess.py --real-shapes

Each run appends one JSON line to benchmarks/preprocess_results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import torch  # noqa: E402
from bench_train import git_commit, machine, versions  # noqa: E402
from PIL import Image  # noqa: E402

from sdft import tiny  # noqa: E402

RESULTS = HERE / "preprocess_results.jsonl"

# Architectures of the models the README recommends, from their config.json on the Hub.
REAL = {
    "blip-large (Salesforce/blip-image-captioning-large)": dict(
        text_config=dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, encoder_hidden_size=1024, max_position_embeddings=512),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=384, patch_size=16),
        projection_dim=512),
    "swin2sr-x2 (caidas/swin2SR-classical-sr-x2-64)": dict(
        image_size=64, patch_size=1, num_channels=3, embed_dim=180, depths=[6] * 6, num_heads=[6] * 6,
        window_size=8, mlp_ratio=2.0, upscale=2, upsampler="pixelshuffle", img_range=1.0),
    "clipseg-rd64-refined (CIDAS/clipseg-rd64-refined)": dict(
        text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=16),
        projection_dim=512, extract_layers=[3, 6, 9], reduce_dim=64, decoder_num_attention_heads=4,
        decoder_intermediate_size=2048, use_complex_transposed_convolution=True),
}


def timed_per_image(fn, images: list, repeats: int = 1) -> float:
    fn(images[:1])   # warm-up: first-call allocations and lazy imports
    start = time.perf_counter()
    for _ in range(repeats):
        fn(images)
    return (time.perf_counter() - start) / (repeats * len(images))


def bench_tiny(count: int) -> dict:
    from sdft.data.preprocess.captioning import Captioner
    from sdft.data.preprocess.masking import Segmenter
    from sdft.data.preprocess.upscaling import Upscaler

    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        captioner = Captioner(str(tiny.build_blip(root / "blip")), device)
        upscaler = Upscaler(str(tiny.build_swin2sr(root / "swin2sr")), device)
        segmenter = Segmenter(str(tiny.build_clipseg(root / "clipseg")), device)
    photos = [Image.new("RGB", (48 + i, 64), (30 * i % 255, 90, 200)) for i in range(count)]
    small = [Image.new("RGB", (20 + i, 28), (30 * i % 255, 90, 200)) for i in range(count)]
    return {
        "captioning_s_per_image": round(timed_per_image(lambda ims: captioner(ims, "a photo of TOK, "), photos), 4),
        "captioning_batch": count,
        "upscaling_s_per_image": round(timed_per_image(lambda ims: [upscaler(im, 32) for im in ims], small), 4),
        "upscaling_input": "20-27 x 28 px to >= 32 px (one x2 pass)",
        "masking_s_per_image": round(timed_per_image(lambda ims: [segmenter(im, ["a face"]) for im in ims], photos), 4),
        "masking_prompts": 1,
    }


def count_flops(model, **inputs) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs)
    return counter.get_total_flops()


def matmul_flops_per_s(side: int = 1024, repeats: int = 10) -> float:
    """This machine's fp32 matmul throughput: the best case for turning FLOPs into seconds."""
    a, b = torch.randn(side, side), torch.randn(side, side)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * side**3 * repeats / (time.perf_counter() - start)


def bench_real_shapes(upscale_side: int, caption_tokens: int) -> dict:
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        Swin2SRConfig,
        Swin2SRForImageSuperResolution,
    )

    (blip_name, blip), (swin_name, swin), (seg_name, seg) = REAL.items()
    out = {}
    with torch.device("meta"):
        model = BlipForConditionalGeneration(BlipConfig(**blip)).eval()
        # Generation with a KV cache costs about one teacher-forced pass over the caption's tokens.
        flops = count_flops(model, pixel_values=torch.zeros(1, 3, 384, 384),
                            input_ids=torch.zeros(1, caption_tokens, dtype=torch.long))
        out[blip_name] = {"params": sum(p.numel() for p in model.parameters()), "flops_per_image": flops,
                          "input": f"384 x 384, {caption_tokens} caption tokens"}
        model = Swin2SRForImageSuperResolution(Swin2SRConfig(**swin)).eval()
        flops = count_flops(model, pixel_values=torch.zeros(1, 3, upscale_side, upscale_side))
        out[swin_name] = {"params": sum(p.numel() for p in model.parameters()), "flops_per_image": flops,
                          "input": f"{upscale_side} x {upscale_side} (one x2 pass)"}
        model = CLIPSegForImageSegmentation(CLIPSegConfig(**seg)).eval()
        flops = count_flops(model, pixel_values=torch.zeros(1, 3, 352, 352),
                            input_ids=torch.zeros(1, 77, dtype=torch.long), interpolate_pos_encoding=True)
        out[seg_name] = {"params": sum(p.numel() for p in model.parameters()), "flops_per_image": flops,
                         "input": "352 x 352, one prompt"}
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="time the tiny models on the CPU")
    parser.add_argument("--real-shapes", action="store_true", help="parameters and FLOPs of the real models")
    parser.add_argument("--images", type=int, default=8, help="images per tiny measurement")
    parser.add_argument("--upscale-side", type=int, default=512, help="input side for the Swin2SR FLOP count")
    parser.add_argument("--caption-tokens", type=int, default=20, help="caption length for the BLIP FLOP count")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    if not (args.tiny or args.real_shapes):
        parser.error("give --tiny and/or --real-shapes")
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/bench_preprocess.py " + shlex.join(argv),
              "git_commit": git_commit(), "versions": versions(), "machine": machine(),
              "load_average_1min": round(os.getloadavg()[0], 2)}
    if args.tiny:
        record["tiny"] = bench_tiny(args.images)
    if args.real_shapes:
        record["real_shapes"] = bench_real_shapes(args.upscale_side, args.caption_tokens)
        throughput = matmul_flops_per_s()
        record["cpu_fp32_matmul_gflops"] = round(throughput / 1e9, 1)
        for entry in record["real_shapes"].values():
            # A lower bound: real layers (attention, convolutions, small matmuls) run below matmul peak.
            entry["cpu_s_per_image_at_matmul_peak"] = round(entry["flops_per_image"] / throughput, 2)
    print(json.dumps(record, indent=2))
    if not args.no_record:
        with open(RESULTS, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
