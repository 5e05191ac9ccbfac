"""llmc's fused CPU kernels for onnxruntime: a custom-op library compiled on first use.

The library (kernels/cpu/) implements `llmc.PagedAttention`, the op each layer of a step graph calls,
as one kernel that reads the KV pools in place through the block tables. onnxruntime runs it
instead of the op's ONNX function body (gathers, concatenations, RoPE, a padded masked Attention:
~13 nodes per layer). Both compute the same thing; tests hold them to each other and to torch.

It is compiled once per machine with the system C++ compiler (-O3 -march=native) into llmc's cache,
keyed by the sources, the flags, the compiler and the CPU. Without a compiler, or with
LLMC_FUSED_KERNELS=0, engines run the function body: same results, slower.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from llmc.paths import cache_root

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent / "cpu"
SOURCES = ("ort_ops.cc", "paged_attention.cc", "paged_attention_tiles.cc", "paged_attention_amx.cc", "int8_linear.cc",
           "int8_linear_vnni.cc", "int8_linear_op.cc", "int4_linear.cc", "int4_linear_op.cc")
HEADERS = ("ort_abi.h", "ort_ops.h", "paged_attention.h", "amx_tiles.h", "amx_emulation.h", "int8_linear.h",
           "int4_linear.h", "vec16.h", "aligned_vector.h")
LIBRARY = "libllmc_ort_ops.so"
ENV_SWITCH = "LLMC_FUSED_KERNELS"


def _flags() -> list[str]:
    """Compile flags. -ffast-math is for compiling only: linked with it, GCC adds a constructor that turns
    on flush-to-zero in whichever thread loads the library, changing the host program's float math."""
    native = "-mcpu=native" if platform.machine() in ("arm64", "aarch64") else "-march=native"
    return ["-O3", native, "-ffast-math", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-Wno-psabi"]


LINK_FLAGS = ["-shared", "-fPIC"]


def _cpu_identity() -> str:
    """The CPU's model and feature flags (-march=native code is only valid on the same kind of CPU)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))


def _compiler() -> str | None:
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    return shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _build_key(compiler: str) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update((SOURCE_DIR / name).read_bytes())
    for part in (" ".join(_flags() + LINK_FLAGS), version, _cpu_identity()):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def compile_library(target: Path, compiler: str, extra_flags: tuple[str, ...] = ()) -> None:
    """Compile the sources into target (atomically: a half-written library is never left there). The tests
    pass extra_flags=("-DLLMC_AMX_EMULATION",) for a library whose AMX kernels run on a scalar model of the
    tiles (kernels/cpu/amx_emulation.h), to check them on CPUs without AMX."""
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("compiling llmc's fused CPU kernels with %s (once per machine) into %s", compiler, target)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / LIBRARY
        objects = [Path(tmp) / f"{Path(source).stem}.o" for source in SOURCES]
        for source, obj in zip(SOURCES, objects):
            subprocess.run([compiler, *_flags(), *extra_flags, "-c", "-o", str(obj), str(SOURCE_DIR / source)],
                           check=True, capture_output=True, text=True)
        subprocess.run([compiler, *LINK_FLAGS, "-o", str(out), *map(str, objects)],
                       check=True, capture_output=True, text=True)
        os.replace(out, target)
    log.info("fused CPU kernels compiled in %.1f s", time.perf_counter() - start)


@functools.cache
def fused_kernels_library() -> Path | None:
    """Path of the compiled library, building it if needed; None when it is switched off or cannot be built
    (logged once, with the reason and what to do)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        log.info("%s=0: attention runs as the ONNX function body", ENV_SWITCH)
        return None
    compiler = _compiler()
    if compiler is None:
        log.warning("no C++ compiler ($CXX, c++, g++ or clang++) found: attention runs as the ONNX function "
                    "body, which is slower; install one (e.g. apt install g++) to get llmc's fused CPU kernels")
        return None
    target = cache_root() / "kernels" / _build_key(compiler) / LIBRARY
    if not target.is_file():
        try:
            compile_library(target, compiler)
        except (subprocess.CalledProcessError, OSError) as exc:
            detail = getattr(exc, "stderr", None) or str(exc)
            log.warning("compiling llmc's fused CPU kernels failed, attention runs as the ONNX function body "
                        "(slower): %s", detail.strip()[-2000:])
            return None
    return target


def register_fused_kernels(options) -> bool:
    """Register the library with onnxruntime SessionOptions; False (logged, with what to do) when it is
    unavailable or onnxruntime cannot load it, so that sessions run the function body instead."""
    library = fused_kernels_library()
    if library is None:
        return False
    try:
        options.register_custom_ops_library(str(library))
    except Exception as exc:  # onnxruntime raises its own Fail/RuntimeError types
        log.warning("onnxruntime could not load llmc's fused CPU kernels from %s (%s): attention runs as the ONNX "
                    "function body; delete that file to rebuild it", library, exc)
        return False
    return True


INT8_BACKENDS = {1: "AMX", 2: "AVX-512 VNNI"}  # llmc::Int8Backend (kernels/cpu/int8_linear.h); 0: none
INT8_BACKEND_ENV = "LLMC_INT8_BACKEND"  # avx512-vnni or none: a lesser backend than the CPU's best


def _ask_library(symbol: str) -> int | None:
    """The int the library's `symbol()` returns (what it runs here), or None when there is no library."""
    library = fused_kernels_library()
    return None if library is None else int(getattr(ctypes.CDLL(str(library)), symbol)())


def int8_backend() -> str | None:
    """What the library's llmc.Int8Linear kernel runs on here ("AMX" or "AVX-512 VNNI"), or None where it
    is not registered (no AMX, no AVX-512 VNNI + BF16, or LLMC_INT8_BACKEND=none). Asking for AMX also asks
    Linux for the per-process tile permission. Read on each call, as the kernel reads the variable."""
    try:
        return INT8_BACKENDS.get(_ask_library("llmc_int8_backend"))
    except (OSError, AttributeError) as exc:
        log.warning("could not ask llmc's kernel library about its int8 GEMM (%s): the int8 graph is not used", exc)
        return None


def avx512_vnni_available() -> bool:
    """Whether the VNNI backend runs here (LLMC_INT8_BACKEND=avx512-vnni asks for it on AMX CPUs)."""
    return bool(_ask_library("llmc_avx512_vnni_usable"))


def int4_available() -> bool:
    """Whether the library's llmc.Int4Linear kernel runs here (AVX-512 VNNI): the int4 decode graph's op."""
    try:
        return bool(_ask_library("llmc_int4_usable"))
    except (OSError, AttributeError) as exc:
        log.warning("could not ask llmc's kernel library about its int4 GEMV (%s): the int4 decode graph is not used",
                    exc)
        return False


def amx_available() -> bool:
    """Whether the library's AMX kernels run here (the int8 GEMM's and attention's bf16 tiles)."""
    return bool(_ask_library("llmc_amx_usable"))


def bf16_attention_available() -> bool:
    """Whether attention's bf16 prefill tiles run here: on AMX, or without it on AVX-512 BF16."""
    return bool(_ask_library("llmc_bf16_attention_usable"))
