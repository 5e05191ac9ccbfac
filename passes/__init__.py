"""Compiler passes, one per file (quantization, paged attention, speculative pairing...)."""
