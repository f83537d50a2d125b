"""Kiln: compile, verify and serve optimized models over the Open Inference Protocol."""

__version__ = "0.1.0"
