"""Host <-> device copies through the staging rings (runtime/device_staging.py): every array arrives with its
dtype, shape and values, packed together at aligned offsets; a ring's buffers are reused and grown without
corrupting what was handed out. Here the device is the CPU (the rings are not page-locked); the GPU check runs
the same code on CUDA."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the device staging is not tested here")

from llmc.runtime.device_staging import RING, DeviceStaging  # noqa: E402


def _arrays(rng, scale: int) -> list[np.ndarray]:
    """Mixed dtypes and shapes with odd byte sizes (so packing must align them), one of them empty."""
    return [rng.integers(-5, 2**40, 3 * scale, dtype=np.int64), rng.integers(0, 9, (scale, 5), dtype=np.int32),
            rng.random(scale) < 0.5, rng.random(2 * scale), np.zeros((0, 4), np.int32),
            rng.integers(0, 100, 7 * scale, dtype=np.int32)]


def test_arrays_arrive_whole_through_a_reused_and_growing_ring():
    rng = np.random.default_rng()
    staging = DeviceStaging("cpu")
    handed_out = []
    for k in range(3 * RING):  # the ring wraps several times; buffers grow midway
        arrays = _arrays(rng, 1 + (k > RING) * int(rng.integers(50, 500)))
        tensors = staging.to_device(*arrays)
        handed_out.append((arrays, tensors))
        for array, tensor in zip(arrays, tensors):
            assert tensor.dtype == torch.from_numpy(array[:0]).dtype and tuple(tensor.shape) == array.shape
            assert tensor.data_ptr() % 16 == 0  # as a fresh tensor would be, for the kernels' pointer alignment
            np.testing.assert_array_equal(tensor.numpy(), array)
    for arrays, tensors in handed_out:  # device tensors are their own, not views of a reused host buffer
        for array, tensor in zip(arrays, tensors):
            np.testing.assert_array_equal(tensor.numpy(), array)


def test_copies_into_a_static_buffer_and_picks_back_to_the_host():
    rng = np.random.default_rng()
    staging = DeviceStaging("cpu")
    static = torch.zeros(64, dtype=torch.int64)
    values = rng.integers(-2**40, 2**40, 40)
    staging.copy_to(static[:40], values)
    np.testing.assert_array_equal(static[:40].numpy(), values)
    assert not static[40:].any()
    picks = [staging.to_host(torch.from_numpy(rng.integers(0, 50_000, n))) for n in (1, 64, 3)]
    expected = [p.on_device.numpy().copy() for p in picks]
    for _ in range(RING - len(picks)):  # other copies before the picks are read, short of wrapping the ring
        staging.to_host(torch.zeros(64, dtype=torch.int64))
    for p, want in zip(picks, expected):
        np.testing.assert_array_equal(p.tokens(), want)
