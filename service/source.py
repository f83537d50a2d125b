"""What a version folder holds: sources to compile (`model.onnx`, `model.pt2`) and built artifacts a
backend serves as they are (an OpenVINO IR, a `.tflite`, a TensorRT `.plan`, a Core ML `.mlpackage`),
the files Triton and OVMS users bring."""

from __future__ import annotations

from pathlib import Path

SOURCE_FILES = {"onnx": "model.onnx", "pt2": "model.pt2"}
# format -> the file (or folder) that is the artifact, and the companions it needs.
ARTIFACT_FILES: dict[str, tuple[str, tuple[str, ...]]] = {
    "openvino_ir": ("model.xml", ("model.bin",)),
    "tflite": ("model.tflite", ()),
    "plan": ("model.plan", ()),
    "mlpackage": ("model.mlpackage", ()),
}


def find_sources(version_dir: Path) -> dict[str, Path]:
    """Formats present in a version folder, e.g. {"onnx": .../model.onnx, "openvino_ir": .../model.xml}:
    sources first, then artifacts."""
    found = {fmt: version_dir / f for fmt, f in SOURCE_FILES.items() if (version_dir / f).is_file()}
    for fmt, (main, companions) in ARTIFACT_FILES.items():
        path = version_dir / main
        if path.exists() and all((version_dir / c).is_file() for c in companions):
            found[fmt] = path
    return found


def compilable(sources: dict[str, Path]) -> dict[str, Path]:
    """The sources only (what a backend compiles and the reference runs)."""
    return {fmt: p for fmt, p in sources.items() if fmt in SOURCE_FILES}
