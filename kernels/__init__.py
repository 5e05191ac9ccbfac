"""Kernels: reference (torch/numpy) implementations shared by the model IR and the backends."""
