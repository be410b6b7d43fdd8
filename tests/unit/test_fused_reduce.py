"""The fused gradient reduce (sdft.fused_reduce) on a one-process gloo group: buckets that fill
during the backward pass are reduced and stepped there, the rest when it ends, every gradient is
freed, and the result is the ordinary optimizer step. (Two processes agreeing with DDP is tested
end to end in tests/integration/test_optimizers.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from sdft.fused_reduce import ReducingUpdater
from sdft.stepping import OptimizerStepper, ParamUpdater


@pytest.fixture()
def gloo_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def model_and_batch() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(16, 16) for _ in range(4)))
    return model, torch.randn(8, 16)


def test_buckets_are_reduced_and_stepped_inside_the_backward_pass(gloo_group, monkeypatch):
    reference, batch = model_and_batch()
    plain = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    reference(batch).square().mean().backward()
    plain.step()

    model, _ = model_and_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # A layer (a 16x16 weight, 1 KiB, and its bias) fills a bucket: three are stepped before the backward pass ends.
    reducer = ReducingUpdater(ParamUpdater(optimizer), world_size=1, bucket_bytes=1024)
    stepper = OptimizerStepper(optimizer, reducer, fused=True)
    reduced = []
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, **kwargs: reduced.append(tensor.numel()))
    model(batch).square().mean().backward()
    stepper.step()   # nothing left to do: the backward pass stepped every parameter
    assert len(reduced) == 4 and sum(reduced) == sum(p.numel() for p in model.parameters())
    assert all(p.grad is None for p in model.parameters()), "each gradient is freed once applied"
    assert not reducer.pending and not reducer.flush_queued
    for mine, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_gradients_are_averaged_over_the_processes(gloo_group):
    """world_size 2 on a one-process group: the sum is this process's gradient, so the average halves it."""
    model, batch = model_and_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    reference, _ = model_and_batch()
    reference(batch).square().mean().backward()
    stepper = OptimizerStepper(optimizer, ReducingUpdater(ParamUpdater(optimizer), world_size=2), fused=True)
    model(batch).square().mean().backward()
    stepper.remove_hooks()
    for start, now, ref in zip(before, model.parameters(), reference.parameters()):
        torch.testing.assert_close(start - now, ref.grad / 2, rtol=1e-6, atol=1e-7)
