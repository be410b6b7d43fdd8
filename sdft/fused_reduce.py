"""A fused backward pass on several processes: each process's gradients are averaged across
processes inside the backward pass, in buckets, just before the per-parameter step that uses them
(OneTrainer's fused gradient reduce, for the same reason).

DistributedDataParallel cannot be used for this: its reducer averages gradients in its own hooks,
which run after the hook that steps a parameter (the step would use the local gradient), and it keeps
a second copy of every gradient in its buckets, the memory a fused backward pass exists to save. So
the trained models are prepared without DDP (`prepare_without_ddp`), and `ReducingUpdater` stands in
for the `sdft.stepping.ParamUpdater` that the fused hooks call: on the micro-step that ends an
accumulation it gathers the ready gradients into a bucket, all-reduces the bucket once it holds
`bucket_bytes` (and whatever is left when the backward pass ends), averages, and only then steps and
frees each of its parameters. Gradients of the earlier micro-steps add up locally in `.grad`, as
with DDP's `no_sync`, so the reduced sum is the same one DDP would reduce.

Every process runs the same graph, so the hooks fire in the same order everywhere and the buckets
(and their collectives) match across processes.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

BUCKET_BYTES = 25 * 2**20   # DDP's default bucket_cap_mb


def prepare_without_ddp(accelerator, modules: Iterable[torch.nn.Module]) -> None:
    """accelerate's preparation (device, mixed-precision autocast) without the DDP wrapper; a later
    `accelerator.prepare` leaves the prepared modules as they are. The replicas start from process
    0's weights, as DDP would make them."""
    for module in modules:
        accelerator.prepare_model(module, evaluation_mode=True)
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)


class ReducingUpdater:
    """Wraps a ParamUpdater (`begin`, `params`, `__call__(param)`) for the fused backward hooks."""

    def __init__(self, updater, world_size: int, bucket_bytes: int = BUCKET_BYTES, group=None):
        self.updater = updater
        self.world_size = world_size
        self.bucket_bytes = bucket_bytes
        self.group = group
        self.pending: dict[tuple, list[torch.Tensor]] = {}   # one bucket per gradient dtype and device
        self.filled: dict[tuple, int] = {}                   # bytes in each bucket
        self.flush_queued = False

    @property
    def params(self) -> list[torch.Tensor]:
        return self.updater.params

    def begin(self, step_index: int) -> None:
        self.updater.begin(step_index)

    def end_step(self) -> None:
        self.updater.end_step()

    def __call__(self, param: torch.Tensor) -> None:
        """Called from `param`'s post-accumulate-grad hook when its gradient is complete."""
        if param.grad is None:
            return
        if not self.flush_queued:
            # Runs once the backward pass is over: the last, partly filled buckets.
            torch.autograd.Variable._execution_engine.queue_callback(self.flush)
            self.flush_queued = True
        key = (param.grad.dtype, param.grad.device)
        self.pending.setdefault(key, []).append(param)
        self.filled[key] = self.filled.get(key, 0) + param.grad.numel() * param.grad.element_size()
        if self.filled[key] >= self.bucket_bytes:
            self.reduce_and_step(key)

    def flush(self) -> None:
        self.flush_queued = False
        while self.pending:
            self.reduce_and_step(next(iter(self.pending)))

    def reduce_and_step(self, key: tuple) -> None:
        bucket = self.pending.pop(key)
        del self.filled[key]
        grads = [param.grad for param in bucket]
        flat = _flatten_dense_tensors(grads)
        # Divided before the sum, as DDP's reducer does (keeps bf16/fp16 sums in range).
        flat.div_(self.world_size)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        for grad, averaged in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(averaged)
        del flat
        for param in bucket:
            self.updater(param)
