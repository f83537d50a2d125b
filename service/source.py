"""Model sources in a version folder (`model.onnx`, `model.pt2`)."""

from __future__ import annotations

from pathlib import Path

SOURCE_FILES = {"onnx": "model.onnx", "pt2": "model.pt2"}


def find_sources(version_dir: Path) -> dict[str, Path]:
    """Source formats present in a version folder, e.g. {"onnx": .../model.onnx}."""
    return {fmt: version_dir / f for fmt, f in SOURCE_FILES.items() if (version_dir / f).is_file()}
