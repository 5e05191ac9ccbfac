"""This CPU's peak dot-product rates per core and on all cores at once: VPDPBUSD (int8, AVX-512 VNNI),
VDPBF16PS (bf16, AVX-512 BF16) and VFMADD231PS (fp32), 16 independent zmm accumulators, no memory
operands. What llmc's int8 kernel (and a bf16 peer such as vLLM's oneDNN GEMMs) can reach at best.

    python benchmarks/cpu_peaks.py          (needs a C++ compiler and AVX-512; AMX is not measured here)
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

SOURCE = r"""
#include <chrono>
#include <cstdio>
#define LOOP(op) asm volatile("1:\n" \
  op " %%zmm16, %%zmm17, %%zmm0\n" op " %%zmm16, %%zmm17, %%zmm1\n" op " %%zmm16, %%zmm17, %%zmm2\n" \
  op " %%zmm16, %%zmm17, %%zmm3\n" op " %%zmm16, %%zmm17, %%zmm4\n" op " %%zmm16, %%zmm17, %%zmm5\n" \
  op " %%zmm16, %%zmm17, %%zmm6\n" op " %%zmm16, %%zmm17, %%zmm7\n" op " %%zmm16, %%zmm17, %%zmm8\n" \
  op " %%zmm16, %%zmm17, %%zmm9\n" op " %%zmm16, %%zmm17, %%zmm10\n" op " %%zmm16, %%zmm17, %%zmm11\n" \
  op " %%zmm16, %%zmm17, %%zmm12\n" op " %%zmm16, %%zmm17, %%zmm13\n" op " %%zmm16, %%zmm17, %%zmm14\n" \
  op " %%zmm16, %%zmm17, %%zmm15\n" "dec %0\n jnz 1b\n" : "+r"(n) :: "memory")
int main() {
  const long iterations = 50000000;
  const char* names[] = {"vpdpbusd", "vdpbf16ps", "vfmadd231ps"};
  for (int which = 0; which < 3; ++which) {
    long n = iterations;
    auto start = std::chrono::steady_clock::now();
    if (which == 0) LOOP("vpdpbusd"); else if (which == 1) LOOP("vdpbf16ps"); else LOOP("vfmadd231ps");
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    printf("%s %.4f\n", names[which], iterations * 16 / s / 1e9);
  }
}
"""
OPS_PER_INSTRUCTION = {"vpdpbusd": 128, "vdpbf16ps": 64, "vfmadd231ps": 32}  # 16 lanes x MACs x 2


def main() -> None:
    cores = sorted(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        binary = Path(tmp) / "peaks"
        source = Path(tmp) / "peaks.cc"
        source.write_text(SOURCE)
        subprocess.run([os.environ.get("CXX", "c++"), "-O2", "-o", str(binary), str(source)], check=True)
        runs = [subprocess.Popen(["taskset", "-c", str(core), str(binary)], stdout=subprocess.PIPE, text=True)
                for core in cores]  # every core at once
        outputs = [run.communicate()[0] for run in runs]
    rates = [{name: float(rate) for name, rate in (line.split() for line in out.splitlines())} for out in outputs]
    report = {}
    for name, ops in OPS_PER_INSTRUCTION.items():
        per_core = [r[name] for r in rates]
        report[name] = {"g_instructions_per_s_per_core": [round(x, 2) for x in per_core],
                        "tops_all_cores": round(sum(per_core) * ops / 1e3, 3)}
    print(json.dumps({"cores": len(cores), "peaks": report}, indent=1))


if __name__ == "__main__":
    main()
