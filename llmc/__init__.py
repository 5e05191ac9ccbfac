"""llmc: an ahead-of-time compiler and serving runtime for decoder-only LLMs.

    from llmc import LLM, SamplingParams
    llm = LLM("out/smollm2-135m")
    llm.generate(["The capital of France is"], SamplingParams(max_tokens=16))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"  # the package's version (pyproject reads it) and every manifest's llmc_version
__all__ = ["LLM", "SamplingParams", "StructuredOutput", "__version__"]

if TYPE_CHECKING:
    from llmc.runtime.llm import LLM
    from llmc.runtime.sequence import SamplingParams, StructuredOutput


def __getattr__(name: str):
    """LLM, SamplingParams and StructuredOutput on first use: `import llmc` (the CLI's start) stays light."""
    if name == "LLM":
        from llmc.runtime.llm import LLM

        return LLM
    if name in ("SamplingParams", "StructuredOutput"):
        from llmc.runtime import sequence

        return getattr(sequence, name)
    raise AttributeError(f"module 'llmc' has no attribute {name!r}")
