"""--blocks_to_swap N: keep N of the denoiser's blocks in host memory and move each one to the
accelerator just before it runs (kohya sd-scripts' flag; musubi-tuner PR #972 measured that copying
host-to-device only, never back, is what keeps the slowdown small).

How the weights stay right, with or without --fused_backward_pass:

- A swapped block's parameters live in one host copy each (pinned when the accelerator is CUDA).
  Bringing a block in makes a fresh accelerator copy and points `param.data` at it; sending it out
  points `param.data` back at the host copy and drops the accelerator copy, without copying back.
  That is only right because the weights never change on the accelerator: the optimizer steps a
  swapped block's parameters on the host (their gradients and optimizer state live there too), after
  the backward pass, or, with the fused backward pass, as soon as the block has left the accelerator
  (`on_release`).
- Forward: each block's forward pre-hook brings it in and starts copying the next swapped block on a
  side stream (CUDA); its forward hook sends it out again.
- Backward: autograd keeps the parameter objects themselves for the backward pass, so a block must be
  back on the accelerator before its backward runs: a hook on the block's outputs brings it in (and
  prefetches the block before it). It leaves once every gradient it produces is complete: each trained
  parameter's gradient accumulated and, when it also has frozen weights (adapters), every input's
  gradient. Whatever is still in at the end of the backward pass leaves then (an autograd callback).
  With gradient checkpointing the block's forward runs again inside its backward; the hooks see that
  the block is in its backward pass and leave it where it is.

The swapper is generic over (host, compute) devices and always copies, so with both on the CPU every
copy and hook runs for real (that is how the tests check it against a run without swapping).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial

import torch

logger = logging.getLogger("sdft")


def swap_devices(device: torch.device) -> tuple[torch.device, torch.device] | None:
    """(host, compute) for --blocks_to_swap on this run's device; None without an accelerator (the
    blocks are in host memory already)."""
    if device.type == "cpu":
        return None
    return torch.device("cpu"), device


def denoiser_blocks(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks in the order they run: an SD3 transformer's `transformer_blocks`, a UNet's
    down, mid and up blocks."""
    if hasattr(denoiser, "transformer_blocks"):
        return list(denoiser.transformer_blocks)
    mid = [denoiser.mid_block] if getattr(denoiser, "mid_block", None) is not None else []
    return [*denoiser.down_blocks, *mid, *denoiser.up_blocks]


def tensors_in(value) -> list[torch.Tensor]:
    """The tensors of a block's inputs or outputs (tensors, tuples, lists, dicts, nested)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in tensors_in(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in tensors_in(item)]
    return []


class BlockSwapper:
    """Swaps the last `count` of `blocks` between `host` and `compute` (see the module docstring)."""

    def __init__(self, blocks: list[torch.nn.Module], count: int, host: torch.device, compute: torch.device,
                 on_release: Callable[[list[torch.nn.Parameter]], None] | None = None):
        if not 0 < count <= len(blocks):
            raise ValueError(f"blocks_to_swap must be between 1 and {len(blocks)}, got {count}")
        self.blocks, self.host, self.compute, self.on_release = blocks, host, compute, on_release
        self.swapped = list(range(len(blocks) - count, len(blocks)))
        pin = host.type == "cpu" and compute.type == "cuda"
        self.tensors = {i: [*blocks[i].parameters(), *blocks[i].buffers()] for i in self.swapped}
        self.host_copies = {}
        for i in self.swapped:
            copies = [t.detach().to(host, copy=True) for t in self.tensors[i]]
            self.host_copies[i] = [c.pin_memory() for c in copies] if pin else copies
            for tensor, copy in zip(self.tensors[i], self.host_copies[i]):
                tensor.data = copy
        self.stream = torch.cuda.Stream(compute) if compute.type == "cuda" else None
        self.resident: set[int] = set()       # swapped blocks whose accelerator copy is in use
        self.prefetched: dict[int, tuple[list[torch.Tensor], object]] = {}
        self.in_backward: set[int] = set()
        self.waiting: dict[int, set] = {}     # per block in its backward: what must finish before it leaves
        self.callback_queued = False
        self.copies_in = 0                    # blocks copied to the accelerator (for the log and the tests)
        self.hooks = []
        self._install()

    # ------------------------------------------------------------------ hooks

    def _install(self) -> None:
        for index, block in enumerate(self.blocks):
            self.hooks.append(block.register_forward_pre_hook(partial(self._before_forward, index), with_kwargs=True))
            self.hooks.append(block.register_forward_hook(partial(self._after_forward, index), with_kwargs=True))
        for index in self.swapped:
            for param in self.trained(index):
                self.hooks.append(param.register_post_accumulate_grad_hook(partial(self._gradient_done, index)))

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def trained(self, index: int) -> list[torch.nn.Parameter]:
        return [p for p in self.blocks[index].parameters() if p.requires_grad]

    def _before_forward(self, index: int, module, args, kwargs) -> None:
        if index in self.in_backward:      # recomputed by gradient checkpointing: already in
            return
        if index == 0:
            self.reclaim()
        self.prefetch(next((i for i in self.swapped if i > index), None))
        if index not in self.swapped:
            return
        self.bring_in(index)
        if torch.is_grad_enabled():
            frozen = any(not p.requires_grad for p in self.blocks[index].parameters())
            inputs = [t for t in tensors_in((args, kwargs)) if t.requires_grad] if frozen else []
            self.waiting[index] = {id(p) for p in self.trained(index)} | {("input", n) for n in range(len(inputs))}
            for number, tensor in enumerate(inputs):
                tensor.register_hook(partial(self._input_done, index, number))

    def _after_forward(self, index: int, module, args, kwargs, output) -> None:
        if index in self.in_backward:
            return
        outputs = [t for t in tensors_in(output) if t.requires_grad] if torch.is_grad_enabled() else []
        for tensor in outputs:
            tensor.register_hook(partial(self._backward_starts, index))
        if index in self.swapped:
            self.send_out(index)

    def _backward_starts(self, index: int, grad: torch.Tensor) -> None:
        if not self.callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self.settle)
            self.callback_queued = True
        if index in self.in_backward:
            return
        self.in_backward.add(index)
        if index in self.swapped:
            self.bring_in(index)
        self.prefetch(next((i for i in reversed(self.swapped) if i < index), None))

    def _gradient_done(self, index: int, param: torch.Tensor) -> None:
        self._done(index, id(param))

    def _input_done(self, index: int, number: int, grad: torch.Tensor) -> None:
        self._done(index, ("input", number))

    def _done(self, index: int, key) -> None:
        waiting = self.waiting.get(index)
        if waiting is None or index not in self.in_backward:
            return
        waiting.discard(key)
        if not waiting:
            del self.waiting[index]
            self.send_out(index, release=True)

    def settle(self) -> None:
        """The end of a backward pass: every swapped block leaves the accelerator, and no prefetched
        copy outlives it (the optimizer is about to change the host weights)."""
        for index in list(self.prefetched):
            _, event = self.prefetched.pop(index)
            if event is not None:
                event.synchronize()
        for index in self.swapped:
            if index in self.resident:
                self.send_out(index, release=index in self.in_backward)
        self.in_backward.clear()
        self.waiting.clear()
        self.callback_queued = False

    # ------------------------------------------------------------------ copies

    def _copies(self, index: int) -> list[torch.Tensor]:
        non_blocking = self.stream is not None
        return [c.to(self.compute, non_blocking=non_blocking, copy=True) for c in self.host_copies[index]]

    def prefetch(self, index: int | None) -> None:
        if index is None or index in self.resident or index in self.prefetched:
            return
        if self.stream is None:
            self.prefetched[index] = (self._copies(index), None)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.compute))
        with torch.cuda.stream(self.stream):
            copies = self._copies(index)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.prefetched[index] = (copies, event)

    def bring_in(self, index: int) -> None:
        if index in self.resident:
            return
        copies, event = self.prefetched.pop(index, (None, None))
        if copies is None:
            copies = self._copies(index)
        if event is not None:
            current = torch.cuda.current_stream(self.compute)
            current.wait_event(event)
            for copy in copies:
                copy.record_stream(current)   # made on the side stream, freed on this one
        for tensor, copy in zip(self.tensors[index], copies):
            tensor.data = copy
            if tensor.grad is not None:       # accumulating: the gradient follows its parameter
                tensor.grad = tensor.grad.to(self.compute, copy=True)
        self.resident.add(index)
        self.copies_in += 1

    def send_out(self, index: int, release: bool = False) -> None:
        """Back to the host copy; `release` after the block's backward: the gradients move too, and
        `on_release` applies the fused updates on the host."""
        for tensor, copy in zip(self.tensors[index], self.host_copies[index]):
            grad = tensor.grad
            tensor.data = copy
            if grad is not None:
                tensor.grad = grad.to(self.host, copy=True)
        self.resident.discard(index)
        if release and self.on_release is not None:
            self.on_release([p for p in self.trained(index) if p.grad is not None])

    def reclaim(self) -> None:
        """Before a forward pass: a swapped block that something else moved (a validation pipeline's
        `.to(device)`) goes back to its host copy, keeping any change made to it there."""
        for index in self.swapped:
            if index in self.resident:
                continue
            for tensor, copy in zip(self.tensors[index], self.host_copies[index]):
                if tensor.data.data_ptr() != copy.data_ptr():
                    copy.copy_(tensor.data)
                    tensor.data = copy


def install(denoiser: torch.nn.Module, count: int, device: torch.device,
            defer: Callable[[list], Callable | None] | None = None) -> BlockSwapper | None:
    """--blocks_to_swap on the run's denoiser, after accelerate placed it; None (and a log line) where
    it has no effect. `defer(params)` (sdft.stepping.OptimizerStepper.defer) hands the swapped blocks'
    fused updates to the swapper, which applies them on the host as each block leaves."""
    devices = swap_devices(device)
    if devices is None:
        logger.warning("--blocks_to_swap %d has no effect on %s: there is no accelerator to swap blocks to.",
                       count, device)
        return None
    blocks = denoiser_blocks(denoiser)
    if count > len(blocks):
        logger.warning("--blocks_to_swap %d: this denoiser has %d blocks; swapping all of them.", count, len(blocks))
        count = len(blocks)
    swapper = BlockSwapper(blocks, count, *devices)
    if defer is not None:
        swapper.on_release = defer([p for i in swapper.swapped for p in swapper.trained(i)])
    logger.info("Block swap: %d of the denoiser's %d blocks live in %s memory and move to %s as they run.",
                count, len(blocks), devices[0], devices[1])
    return swapper
