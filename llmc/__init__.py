"""llmc: an ahead-of-time compiler and serving runtime for decoder-only LLMs."""

__version__ = "0.1.0"
