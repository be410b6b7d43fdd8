"""How an optimizer step is applied: all at once after the backward pass (the usual way), or one
parameter at a time, either after the backward pass or inside it (`--fused_backward_pass`), with
bf16 weights written back by stochastic rounding (`--full_bf16`).

One parameter at a time uses the run's single optimizer, narrowed to that parameter for the call,
so its state, its param groups (and their learning rates, which the LR schedule keeps changing) and
its `state_dict` stay those of one ordinary optimizer: accelerate's save_state/load_state and the
LR scheduler see nothing unusual. Optimizers whose update is per element or per tensor (AdamW,
Adafactor) give the same result either way; the fused backward pass frees each gradient as soon as
it has been applied, so the gradients of the whole model are never held at once (kohya sd-scripts
PR #1259 measured SDXL full fine-tuning at about 10 GB this way).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MASK_BELOW_BF16 = 0xFFFF  # bf16 is the top 16 bits of an fp32: sign, 8 exponent bits, 7 mantissa bits


def stochastic_round_to_bf16(values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability equal to the distance from the lower bf16 value,
    so that the expected result is the fp32 value and updates far below bf16's resolution still move
    the weights on average (Gupta et al. 2015, "Deep learning with limited numerical precision").

    The known integer trick: add uniform random bits below the bf16 mantissa to the fp32 bit
    pattern, then truncate them; a carry into the kept bits is the round-up."""
    bits = values.detach().float().contiguous().view(torch.int32)
    noise = torch.randint(0, MASK_BELOW_BF16 + 1, bits.shape, dtype=torch.int32, device=bits.device,
                          generator=generator)
    rounded = (bits + noise) & ~MASK_BELOW_BF16
    # Non-finite values keep their value (adding bits could turn inf into nan).
    rounded = torch.where(torch.isfinite(values), rounded, bits & ~MASK_BELOW_BF16)
    return rounded.view(torch.float32).to(torch.bfloat16)  # exact: the low bits are zero


def stochastic_round_into(target: torch.Tensor, values: torch.Tensor, generator: torch.Generator | None,
                          scratch: torch.Tensor) -> None:
    """`target.copy_(stochastic_round_to_bf16(values, generator))`, bit for bit, with the random and
    rounded bits in `scratch` (int32, `values`' shape) instead of five tensors of `values`' size
    allocated per call. `values` must be a contiguous fp32 tensor."""
    bits = values.view(torch.int32)
    torch.randint(0, MASK_BELOW_BF16 + 1, bits.shape, generator=generator, out=scratch)
    rounded = scratch.add_(bits).bitwise_and_(~MASK_BELOW_BF16)
    # A finite sum means every value is finite; only then may the non-finite fix-up be skipped.
    if not torch.isfinite(values.sum()):
        rounded = torch.where(torch.isfinite(values), rounded, bits & ~MASK_BELOW_BF16)
    target.copy_(rounded.view(torch.float32))  # exact: the low bits are zero


class UpdateScratch:
    """Two fp32 buffers, each the size of the largest parameter, reused by every per-parameter update:
    the weight's and the gradient's fp32 copies; once the optimizer has stepped, the gradient's buffer
    holds the rounding bits. Per-tensor copies allocated and freed per parameter leave freed memory
    in the C heap that a CPU process does not hand back to the system (benchmarks/README.md, issue 26)."""

    def __init__(self, params: list[torch.Tensor]):
        self.sizes = {}
        for param in params:
            self.sizes[param.device] = max(self.sizes.get(param.device, 0), param.numel())
        self.buffers = {}

    def pair(self, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 weight and gradient views of `param`'s shape (allocated on first use, then reused)."""
        buffers, count = self.buffers.get(param.device), param.numel()
        if buffers is None or buffers.shape[1] < count:  # a parameter that moved or grew since
            size = max(self.sizes.get(param.device, 0), count)
            buffers = self.buffers[param.device] = torch.empty((2, size), dtype=torch.float32, device=param.device)
        return buffers[0, :count].view(param.shape), buffers[1, :count].view(param.shape)


class ParamUpdater:
    """Applies the optimizer to one parameter and frees its gradient.

    With `stochastic_rounding`, a bf16 parameter is stepped on an fp32 copy (the optimizer's state is
    therefore fp32) and written back with `stochastic_round_to_bf16` (`stochastic_round_into`); the
    copies live in an `UpdateScratch` sized for the largest parameter. The random bits come from
    (seed, optimizer step, parameter index), so a resumed run rounds exactly as an uninterrupted one,
    whatever order the parameters are updated in."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, seed: int = 0, stochastic_rounding: bool = False,
                 release: Callable[[], object] | None = None):
        self.optimizer = optimizer
        self.release = release   # after each step's updates: hand freed memory back (sdft.host_memory)
        self.seed = seed
        self.stochastic_rounding = stochastic_rounding
        self.index = {}
        for group_index, group in enumerate(optimizer.param_groups):
            for param in group["params"]:
                self.index[param] = (group_index, len(self.index))
        self.step_index = 0
        self.scratch = None
        if stochastic_rounding:
            keep_state_dtypes(optimizer)
            self.scratch = UpdateScratch([p for p in self.index if p.dtype == torch.bfloat16])

    @property
    def params(self) -> list[torch.Tensor]:
        return list(self.index)

    def begin(self, step_index: int) -> None:
        """The optimizer step (0-based) whose updates follow; it seeds the rounding."""
        self.step_index = step_index

    def end_step(self) -> None:
        """Every parameter of the step has been updated."""
        if self.release is not None:
            self.release()

    def __call__(self, param: torch.Tensor) -> None:
        if param.grad is None:
            return
        group_index, param_index = self.index[param]
        rounded = self.stochastic_rounding and param.dtype == torch.bfloat16
        stored = param.data
        if rounded:
            weight, grad = self.scratch.pair(param)
            param.data = weight.copy_(stored)
            param.grad = grad.copy_(param.grad)
        groups = self.optimizer.param_groups
        self.optimizer.param_groups = [{**groups[group_index], "params": [param]}]
        try:
            self.optimizer.step()
        finally:
            self.optimizer.param_groups = groups
        param.grad = None
        if rounded:
            generator = torch.Generator(device=stored.device).manual_seed(
                hash((self.seed, self.step_index, param_index)) & (2**63 - 1))
            stochastic_round_into(stored, param.data.float().contiguous(), generator, grad.view(torch.int32))
            param.data = stored


class OptimizerStepper:
    """What the training step calls once per micro-step after the backward pass.

    - no updater: `optimizer.step()` and `zero_grad` (accelerate's wrapper skips both while
      gradients accumulate);
    - an updater, `fused=False`: every parameter is updated one at a time once gradients are
      complete (bf16 weights with stochastic rounding);
    - an updater, `fused=True`: the updates ran during the backward pass, in each parameter's
      post-accumulate-grad hook; `step()` has nothing left to do. While gradients accumulate the
      hook leaves them in `.grad` (the micro-batches add up there, as without fusing); the backward
      pass of the micro-batch that ends the accumulation applies and frees them.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, updater: ParamUpdater | None = None, *, fused: bool = False):
        self.optimizer = optimizer
        self.updater = updater
        self.fused = fused
        self.hooks = []
        self.deferred: set[torch.Tensor] = set()   # updated by another owner (see `defer`)
        if fused:
            if updater is None:
                raise ValueError("a fused backward pass needs a ParamUpdater")
            self.hooks = [p.register_post_accumulate_grad_hook(self._gradient_ready) for p in updater.params]

    def _gradient_ready(self, param: torch.Tensor) -> None:
        if param not in self.deferred and gradients_complete(self.optimizer):
            self.updater(param)

    def defer(self, params) -> Callable[[list[torch.Tensor]], None] | None:
        """With the fused backward pass: `params` are updated when their owner says so, through the
        returned function (sdft.block_swap applies a swapped block's updates once it is back on the
        host). None when updates run after the backward pass anyway."""
        if not self.fused:
            return None
        self.deferred |= set(params)
        return self.apply_deferred

    def apply_deferred(self, params: list[torch.Tensor]) -> None:
        if gradients_complete(self.optimizer):
            for param in params:
                self.updater(param)

    def begin(self, step_index: int) -> None:
        if self.updater is not None:
            self.updater.begin(step_index)

    def step(self) -> None:
        if self.updater is None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        elif gradients_complete(self.optimizer):
            if not self.fused:
                for param in self.updater.params:
                    self.updater(param)
            self.updater.end_step()

    def remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


def gradients_complete(optimizer) -> bool:
    """accelerate's optimizer wrapper knows whether this micro-step ends an accumulation; a plain
    torch optimizer (no accumulation) always steps."""
    state = getattr(optimizer, "gradient_state", None)
    return True if state is None else state.sync_gradients


class _StateDtypes:
    """torch's `Optimizer.load_state_dict` casts every floating state tensor to its parameter's
    dtype. The fp32 state of a bf16 parameter (see ParamUpdater) would come back as bf16 and a
    resumed run would no longer match; this puts the saved tensors back as they were saved."""

    def __init__(self):
        self.saved = {}

    def before(self, optimizer: torch.optim.Optimizer, state_dict: dict):
        self.saved = {pid: {k: v for k, v in s.items() if torch.is_tensor(v) and v.is_floating_point()}
                      for pid, s in state_dict["state"].items()}
        return None

    def after(self, optimizer: torch.optim.Optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for pid, tensors in self.saved.items():
            param = params[int(pid)]
            for key, value in tensors.items():
                if key != "step" and value.dtype != optimizer.state[param][key].dtype:
                    optimizer.state[param][key] = value.to(param.device)
        self.saved = {}


def keep_state_dtypes(optimizer: torch.optim.Optimizer) -> None:
    if getattr(optimizer, "_sdft_state_dtypes", None) is None:
        keeper = _StateDtypes()
        optimizer.register_load_state_dict_pre_hook(keeper.before)
        optimizer.register_load_state_dict_post_hook(keeper.after)
        optimizer._sdft_state_dtypes = keeper
