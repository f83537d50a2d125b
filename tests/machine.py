"""What this machine can run, for tests that branch on it: the success path where the hardware or OS
is there, the clear error where it is not."""

from __future__ import annotations


def tensorrt() -> tuple[bool, str]:
    """(True, description) with the TensorRT runtime and an NVIDIA GPU, else (False, the reason)."""
    from backends import get_backend

    return get_backend("tensorrt").available()


def coreml_predicts() -> tuple[bool, str]:
    """(True, platform) on macOS, else (False, "Core ML prediction needs macOS ...")."""
    from backends.coreml import prediction_supported

    return prediction_supported()


def tensorrt_missing(why: str) -> bool:
    return "TensorRT runtime not installed" in why or "no NVIDIA GPU" in why
