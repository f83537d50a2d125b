"""KServe's conventions: `--model_dir /mnt/models` as the storage initializer lays it out.

KServe copies an InferenceService's `storageUri` to /mnt/models and starts the runtime with
`--model_name={{.Name}} --model_dir=/mnt/models`. That folder holds one of:

- a Kiln model repository (sub-folders with a config.yaml or numeric version folders): served as is,
  every model under its own name;
- one model folder (numeric version folders, optional config.yaml);
- one model's files: a bare `*.onnx` / `*.pt2` source or a built artifact — an OpenVINO IR
  (`*.xml` + its `*.bin`), a `*.tflite`, a TensorRT `*.plan`, a Core ML `*.mlpackage` — (the
  storageUri named a file), or a folder with one model, plus an optional config.yaml and the files it
  names (labels, verify samples). A source beside an artifact is the artifact's parity reference, as
  in a version folder (service/source.py).

The last two become a one-model repository named `--model_name`: a folder of symlinks (the mount is
read-only), so the model's config and relative paths work unchanged.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from .repository import version_dirs
from .source import ARTIFACT_FILES, SOURCE_FILES

log = logging.getLogger("kiln.kserve")

# A model file's suffix -> its name in a version folder (service/source.py).
SUFFIXES = {"." + fmt: name for fmt, name in SOURCE_FILES.items()}  # .onnx -> model.onnx, .pt2 -> model.pt2
SUFFIXES.update({Path(main).suffix: main for main, _ in ARTIFACT_FILES.values()})  # .xml, .tflite, .plan, .mlpackage
COMPANIONS = {Path(main).suffix: tuple(Path(c).suffix for c in companions) for main, companions in ARTIFACT_FILES.values()}
NAMES = " / ".join("*" + s for s in SUFFIXES)


def _is_model_dir(d: Path) -> bool:
    return (d / "config.yaml").is_file() or bool(version_dirs(d))


def _is_model_file(p: Path) -> bool:
    """A model file by its suffix: a `.mlpackage` is a folder, the rest are files; an IR's `.xml`
    counts only with its `.bin` beside it (an `.xml` alone is any XML file)."""
    if p.suffix not in SUFFIXES or p.name.startswith("."):
        return False
    if not (p.is_dir() if p.suffix == ".mlpackage" else p.is_file()):
        return False
    return all(p.with_suffix(c).is_file() for c in COMPANIONS.get(p.suffix, ()))


def _model_files(d: Path) -> list[Path]:
    """The folder's model files: at most one per format (a source, an artifact, or both — the source
    is then the artifact's parity reference, as in a version folder)."""
    files = [p for p in sorted(d.iterdir()) if _is_model_file(p)]
    by_suffix: dict[str, list[Path]] = {}
    for p in files:
        by_suffix.setdefault(p.suffix, []).append(p)
    for suffix, group in by_suffix.items():
        if len(group) > 1:
            raise ValueError(f"--model_dir {d} holds {len(group)} {suffix} model files "
                             f"({', '.join(p.name for p in group)}): put each model in a folder of its own")
    return files


def resolve_model_dir(model_dir: Path, model_name: str | None, work_dir: Path | None = None) -> tuple[Path, str]:
    """(repository root to serve, what was found). Raises ValueError when nothing servable is there."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise ValueError(f"--model_dir {model_dir} does not exist")
    name = model_name or "model"
    if model_dir.is_dir() and model_dir.suffix != ".mlpackage":
        if version_dirs(model_dir):
            return _one_model(model_dir, name, work_dir, whole_folder=True), f"model folder served as '{name}'"
        subdirs = [d for d in model_dir.iterdir() if d.is_dir() and not d.name.startswith((".", "_"))]
        if any(_is_model_dir(d) for d in subdirs):
            if model_name:
                log.info("--model_dir %s is a model repository: every model keeps its own name (--model_name %s "
                         "not applied)", model_dir, model_name)
            return model_dir, "model repository"
        files = _model_files(model_dir)
        if not files:
            raise ValueError(f"--model_dir {model_dir} holds no model: expected a Kiln repository, a model folder "
                             f"with numeric version folders, or a model file ({NAMES})")
        return _one_model(model_dir, name, work_dir, files), f"{', '.join(p.name for p in files)} served as '{name}'"
    if model_dir.suffix not in SUFFIXES:
        raise ValueError(f"--model_dir {model_dir} is a file Kiln cannot serve (expected a model file: {NAMES})")
    if not _is_model_file(model_dir):
        missing = ", ".join(model_dir.with_suffix(c).name for c in COMPANIONS.get(model_dir.suffix, ()))
        raise ValueError(f"--model_dir {model_dir} needs {missing} beside it")
    return _one_model(model_dir.parent, name, work_dir, [model_dir]), f"{model_dir.name} served as '{name}'"


def _one_model(folder: Path, name: str, work_dir: Path | None, files: tuple[Path, ...] | list[Path] = (),
               whole_folder: bool = False) -> Path:
    root = Path(tempfile.mkdtemp(prefix="kiln-model-dir-", dir=work_dir))
    model = root / name
    if whole_folder:
        model.symlink_to(folder.resolve(), target_is_directory=True)
        return root
    model.mkdir()
    linked = {p.with_suffix(c) for p in files for c in COMPANIONS.get(p.suffix, ())} | set(files)
    for entry in folder.iterdir():  # config.yaml, labels, data the config refers to
        if entry not in linked and not entry.name.startswith("."):
            (model / entry.name).symlink_to(entry.resolve())
    (model / "1").mkdir()
    for p in files:
        main = SUFFIXES[p.suffix]
        (model / "1" / main).symlink_to(p.resolve())
        for c in COMPANIONS.get(p.suffix, ()):  # an IR's weights: model.bin beside model.xml
            (model / "1" / Path(main).with_suffix(c)).symlink_to(p.with_suffix(c).resolve())
    return root
