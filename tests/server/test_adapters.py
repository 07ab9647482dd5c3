"""The classifier adapter's downsampling, run in cache-sized chunks on the CPU."""

from __future__ import annotations

import torch
from live_server import CLASSIFIER

from neuralode.checkpoint import load_checkpoint
from server.adapters import CPU_CHUNK_BYTES, adapter_for
from server.api import Kind


def test_the_downsampling_runs_in_chunks_within_the_byte_bound_and_gives_the_whole_batchs_features(shipped):
    adapter = adapter_for(load_checkpoint(shipped / f"{CLASSIFIER}.pt").model)
    images = torch.rand(100, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    chunks, widest = [], []
    hooks = [adapter.model.downsample.register_forward_pre_hook(lambda module, args: chunks.append(len(args[0])))]
    hooks += [
        layer.register_forward_hook(lambda module, args, out: widest.append(out.numel() * out.element_size()))
        for layer in adapter.model.downsample
    ]
    with torch.no_grad():
        features = adapter.start(Kind.CLASSIFY, images).y0
        for hook in hooks:
            hook.remove()
        whole = adapter.model.downsample(images)
    assert sum(chunks) == 100 and len(chunks) > 1
    bytes_per_image = max(widest) // max(chunks)
    assert max(chunks) == CPU_CHUNK_BYTES // bytes_per_image  # as many images as fit in the bound
    torch.testing.assert_close(features, whole)
