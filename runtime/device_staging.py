"""Host <-> device copies that never make the host wait for the GPU (async scheduling: the host prepares the next
step while the device runs this one).

A blocking `tensor.to("cuda")` waits for everything queued on the stream, so the next step's inputs could not be
staged while a step runs; a copy from pageable memory may do the same. Here each transfer goes through a page-locked
buffer from a small ring, with `non_blocking=True`, and a buffer is written again only once the event recorded after
its last copy has passed (by then long ago: the ring holds several steps). Without CUDA (the tests) the same calls
are plain copies.
"""

from __future__ import annotations

import time

import numpy as np
import torch

RING = 8  # buffers each way: a step's few calls, over the two steps in flight, never wait for one


class _Ring:
    """Page-locked byte buffers, reused in turn, each with the event of its last copy."""

    def __init__(self, pinned: bool):
        self.pinned = pinned
        self.buffers: list[torch.Tensor | None] = [None] * RING
        self.events: list[torch.cuda.Event | None] = [None] * RING
        self.next = 0

    def take(self, nbytes: int) -> tuple[int, torch.Tensor]:
        """The next buffer (at least nbytes), once its previous copy has run."""
        i, self.next = self.next, (self.next + 1) % RING
        if self.events[i] is not None:
            self.events[i].synchronize()
        buffer = self.buffers[i]
        if buffer is None or buffer.numel() < nbytes:
            buffer = self.buffers[i] = torch.empty(max(nbytes, 4096), dtype=torch.uint8, pin_memory=self.pinned)
        return i, buffer

    def copied(self, i: int) -> torch.cuda.Event | None:
        """Record that buffer i's copy is queued (its event passes once the copy has run)."""
        if not self.pinned:
            return None
        event = self.events[i] = torch.cuda.Event()
        event.record()
        return event


def _aligned(nbytes: int) -> int:
    """nbytes rounded up to 16: each array starts where Triton's pointer specialization (divisible by 16) holds."""
    return -(-nbytes // 16) * 16


class DeviceStaging:
    """A device's host-to-device and device-to-host copies, each one transfer through a page-locked buffer."""

    def __init__(self, device: str):
        self.device = device
        on_cuda = device.startswith("cuda")
        self._up, self._down = _Ring(on_cuda), _Ring(on_cuda)

    def to_device(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        """Each array as a device tensor of its dtype and shape, all in one non-blocking transfer."""
        offsets = np.cumsum([0] + [_aligned(a.nbytes) for a in arrays])
        i, host = self._up.take(int(offsets[-1]))
        packed = host.numpy()
        for array, offset in zip(arrays, offsets):
            packed[offset:offset + array.nbytes] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        device = torch.empty(int(offsets[-1]), dtype=torch.uint8, device=self.device)
        device.copy_(host[:int(offsets[-1])], non_blocking=True)
        self._up.copied(i)
        return [device[offset:offset + a.nbytes].view(torch.from_numpy(a[:0]).dtype).view(a.shape)
                for a, offset in zip(arrays, offsets)]

    def copy_to(self, target: torch.Tensor, array: np.ndarray) -> None:
        """Copy a host array into a device tensor of its dtype and size (a CUDA graph's static buffer)."""
        i, host = self._up.take(array.nbytes)
        host[:array.nbytes].numpy()[:] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        target.view(-1).view(torch.uint8).copy_(host[:array.nbytes], non_blocking=True)
        self._up.copied(i)

    def to_host(self, tensor: torch.Tensor) -> DevicePicks:
        """Start copying an int64 device tensor [N] to the host; the returned handle waits for it when read."""
        nbytes = tensor.numel() * 8
        i, host = self._down.take(nbytes)
        view = host[:nbytes].view(torch.int64)
        view.copy_(tensor, non_blocking=True)
        return DevicePicks(tensor, view, self._down.copied(i))


class DevicePicks:
    """Token ids an engine call is picking on its device: `on_device` [N] int64 as soon as the call is queued (the
    next step reads it there), `tokens()` on the host once the call has run."""

    def __init__(self, on_device: torch.Tensor, host: torch.Tensor, event: torch.cuda.Event | None):
        self.on_device, self._host, self._event = on_device, host, event
        self.wait_s = 0.0  # how long tokens() waited for the device

    def tokens(self) -> np.ndarray:
        """int64 [N] on the host (waits for the call to finish)."""
        if self._event is not None:
            start = time.perf_counter()
            self._event.synchronize()
            self.wait_s = time.perf_counter() - start
        return self._host.numpy().copy()
