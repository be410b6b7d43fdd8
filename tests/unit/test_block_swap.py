"""sdft.block_swap on a small stack of blocks, with (cpu, cpu) as (host, compute): what sits where
after a forward pass without gradients, and a change made while something else had moved a block
(a validation pipeline's `.to(device)`) is kept when the swapper takes the block back."""

from __future__ import annotations

import torch

from sdft.block_swap import BlockSwapper, denoiser_blocks

CPU = torch.device("cpu")


class Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.transformer_blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))

    def forward(self, x):
        for block in self.transformer_blocks:
            x = block(x)
        return x


def test_a_forward_without_gradients_leaves_every_swapped_block_on_its_host_copy():
    model = Stack()
    expected = model(torch.ones(1, 4))
    swapper = BlockSwapper(denoiser_blocks(model), 2, CPU, CPU)
    assert swapper.swapped == [1, 2]
    with torch.no_grad():
        assert torch.equal(model(torch.ones(1, 4)), expected)
    assert swapper.copies_in == 2 and not swapper.resident and not swapper.prefetched
    for index in swapper.swapped:
        for tensor, host in zip(swapper.tensors[index], swapper.host_copies[index]):
            assert tensor.data_ptr() == host.data_ptr()


def test_a_block_moved_by_someone_else_comes_back_with_its_changes():
    model = Stack()
    swapper = BlockSwapper(denoiser_blocks(model), 1, CPU, CPU)
    weight = model.transformer_blocks[2].weight
    weight.data = weight.data.clone()          # what pipeline.to(device) does
    with torch.no_grad():
        weight.add_(1.0)                       # e.g. schedule-free weights swapped in place
    changed = weight.detach().clone()
    with torch.no_grad():
        model(torch.ones(1, 4))
    assert weight.data_ptr() == swapper.host_copies[2][0].data_ptr()
    assert torch.equal(weight, changed)
