"""Whether a bundle's TensorRT engine loads on this machine: a serialized plan loads only in the TensorRT version
that built it and on GPUs of the compute capability it was built for. Checked before a plan is handed to
TensorRT, so a mismatch is a "rebuild with llmc build" message, not a deserialization failure."""

from __future__ import annotations

from pathlib import Path

from llmc.artifacts.bundle import Bundle
from llmc.errors import BundleError

REBUILD = "rebuild it on this server with `llmc build` of its model.yaml (targets: [tensorrt])"


def compute_capability() -> str | None:
    """This GPU's compute capability ("9.0"), through torch; None without torch or a GPU."""
    try:
        import torch
    except ImportError:
        return None
    return "{}.{}".format(*torch.cuda.get_device_capability()) if torch.cuda.is_available() else None


def this_machine() -> tuple[str | None, str | None]:
    """(installed TensorRT version, this GPU's compute capability), each None where absent."""
    try:
        import tensorrt
        version = tensorrt.__version__
    except ImportError:
        version = None
    return version, compute_capability()


def check_plan(bundle: Bundle, tensorrt_version: str | None, compute_capability: str | None) -> Path:
    """The path of the bundle's TensorRT plan if it loads with this TensorRT on this GPU; BundleError saying
    why not (and to rebuild) otherwise."""
    engines = bundle.manifest.engines
    if "tensorrt" not in engines:
        raise BundleError(f"{bundle.path} has no tensorrt target; {REBUILD}")
    entry = engines["tensorrt"]
    if entry.plan is None:
        raise BundleError(f"{bundle.path}: its TensorRT engine was not built ({entry.skipped}); {REBUILD}")
    if tensorrt_version is None:
        raise BundleError(f"{bundle.path}: TensorRT is not installed here (the engine was built by TensorRT "
                          f"{entry.tensorrt}); pip install tensorrt=={entry.tensorrt}, or {REBUILD}")
    if tensorrt_version != entry.tensorrt:
        raise BundleError(f"{bundle.path}: the engine was built by TensorRT {entry.tensorrt} and this server has "
                          f"TensorRT {tensorrt_version}; a TensorRT engine loads only in the version that built it: "
                          f"{REBUILD}")
    if entry.compute_capability is not None and compute_capability != entry.compute_capability:
        raise BundleError(f"{bundle.path}: the engine was built for GPUs of compute capability "
                          f"{entry.compute_capability} and this one is {compute_capability or 'absent'}: {REBUILD}")
    path = bundle.engine_dir("tensorrt") / entry.plan
    if not path.is_file():
        raise BundleError(f"{bundle.path}: the TensorRT engine file {entry.plan} is missing; re-copy the bundle")
    return path
