"""Errors of the optimization toolkit.

``OptimizeError``: the user's input is wrong (missing file, wrong format, value out of range,
calibration data that does not match the model). The CLI prints its message as one line and
exits with code 2. ``StepFailed``: a well-formed request that could not be carried out on this
machine (a backend without a recipe, no candidate under the budget); the CLI exits with code 1.
"""

from __future__ import annotations


class OptimizeError(ValueError):
    """Bad input: the CLI prints ``error: <message>`` and exits 2."""


class StepFailed(RuntimeError):
    """A valid request that could not be carried out here: the CLI prints the message and exits 1."""
