"""Resident memory of the fused per-parameter update alone (--optimizer adafactor --full_bf16: fp32
copy, Adafactor, stochastic rounding), step by step, for the code under CODE_ROOT (issue 26).

    .venv/bin/python benchmarks/bench_update_memory.py .            # this checkout, heap trimmed after each step
    .venv/bin/python benchmarks/bench_update_memory.py . no-trim    # this checkout, scratch buffers only
    git archive 3251eac | tar -x -C /tmp/base                       # the code before issue 26
    .venv/bin/python benchmarks/bench_update_memory.py /tmp/base

The parameters are 4 of the 10 transformer layers and a resnet of the SDXL UNet's first up block
(188.2 M, bf16, random); each step gives every tensor a fresh random bf16 gradient (as the backward
pass does) and updates it. No forward or backward pass, so well under 3 GiB. The weights' checksum
at the end must be the same for every variant (the update is bit-identical).
"""

import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(sys.argv[1]).resolve()))

import torch  # noqa: E402
from accelerate import init_empty_weights  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shaped_models import SDXL_UNET  # noqa: E402

from sdft.optim import AdafactorSettings, build_adafactor  # noqa: E402
from sdft.stepping import ParamUpdater  # noqa: E402


def rss():
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30

torch.manual_seed(0)
with init_empty_weights():  # SDXL base 1.0's UNet config; 4 of the 10 transformer layers of its first up block
    unet = UNet2DConditionModel(**SDXL_UNET)
part = torch.nn.ModuleList([*unet.up_blocks[0].attentions[0].transformer_blocks[:4], unet.up_blocks[0].resnets[0]])
part = part.to_empty(device="cpu").to(torch.bfloat16)
g = torch.Generator().manual_seed(0)
for p in part.parameters():
    p.data.normal_(0, 0.02, generator=g)
params = list(part.parameters())
print(f"{sum(p.numel() for p in params) / 1e6:.1f} M parameters, {len(params)} tensors; resident {rss():.3f} GiB")
optimizer = build_adafactor([{"params": params}], AdafactorSettings(lr=1e-4))
release = None
if Path(sys.argv[1], "sdft", "host_memory.py").is_file() and sys.argv[2:] != ["no-trim"]:
    from sdft.host_memory import release_freed  # noqa: E402

    release = release_freed
updater = ParamUpdater(optimizer, seed=0, stochastic_rounding=True, **({"release": release} if release else {}))
for step in range(4):
    updater.begin(step)
    start = time.time()
    for p in reversed(params):
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(torch.bfloat16)
        updater(p)
    if hasattr(updater, "end_step"):
        updater.end_step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"step {step + 1}: resident {rss():.3f} GiB, peak so far {peak:.3f} GiB ({time.time() - start:.0f} s)", flush=True)
print("weights checksum", sum(float(p.float().sum()) for p in params), "; load", os.getloadavg())
