"""Kiln optimization toolkit: training, pruning, quantization, distillation, search (needs the torch extra)."""
