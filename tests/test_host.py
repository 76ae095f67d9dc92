from __future__ import annotations

import torch

from zimage_turbo.host import HostHomes, pack_tensors


def test_packed_views_keep_dtype_shape_and_values() -> None:
    tensors = [
        torch.randn(3, 5),
        torch.arange(7, dtype=torch.int64),
        torch.randn(2, 2).to(torch.bfloat16),
        torch.empty(0),
    ]
    views, buffers = pack_tensors(tensors, pin=False, chunk_bytes=256)
    for original, view in zip(tensors, views, strict=True):
        assert view.dtype == original.dtype and view.shape == original.shape
        assert torch.equal(view, original)
    # Buffers are never larger than a chunk unless a tensor is; the tail buffer is a power of two.
    assert all(b.numel() <= 256 for b in buffers)
    assert buffers[-1].numel() & (buffers[-1].numel() - 1) == 0
    shared = {view.untyped_storage().data_ptr() for view in views[:3]}
    assert shared <= {b.untyped_storage().data_ptr() for b in buffers}


def test_homes_swap_pointers_not_data() -> None:
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    before = {name: t.detach().clone() for name, t in module.state_dict().items()}
    homes = HostHomes(pin=False)
    pointers = [p.data_ptr() for p in module.parameters()]
    homes.adopt(module)
    assert homes.has_home(module)
    home_pointers = [p.data_ptr() for p in module.parameters()]
    assert home_pointers == pointers  # without pinning, host weights are their own homes: no copy
    # "Moving" to the CPU and back home: values intact, and home is the very same memory.
    homes.send_to(module, torch.device("cpu"))
    homes.send_home(module)
    assert [p.data_ptr() for p in module.parameters()] == home_pointers
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, before[name])
    held = homes.host_bytes
    homes.adopt(module)  # idempotent: nothing packed twice
    assert homes.host_bytes == held
    homes.release(module)
    assert not homes.has_home(module)


def test_tied_weights_are_one_tensor() -> None:
    from zimage_turbo.host import module_tensors as _tensors

    first = torch.nn.Linear(4, 4, bias=False)
    second = torch.nn.Linear(4, 4, bias=False)
    second.weight = first.weight
    module = torch.nn.Sequential(first, second)
    assert len(list(_tensors(module))) == 1
    _, buffers = pack_tensors(list(_tensors(module)), pin=False)
    assert sum(b.numel() for b in buffers) == 64  # one 4x4 float32 weight, in a 64-byte (power of two) buffer
