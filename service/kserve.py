"""KServe's conventions: `--model_dir /mnt/models` as the storage initializer lays it out.

KServe copies an InferenceService's `storageUri` to /mnt/models and starts the runtime with
`--model_name={{.Name}} --model_dir=/mnt/models`. That folder holds one of:

- a Kiln model repository (sub-folders with a config.yaml or numeric version folders): served as is,
  every model under its own name;
- one model folder (numeric version folders, optional config.yaml);
- one model's files: a bare `*.onnx` / `*.pt2` (the storageUri named a file) or a folder with one,
  plus an optional config.yaml and the files it names (labels, verify samples).

The last two become a one-model repository named `--model_name`: a folder of symlinks (the mount is
read-only), so the model's config and relative paths work unchanged.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from .repository import version_dirs
from .source import SOURCE_FILES

log = logging.getLogger("kiln.kserve")

SUFFIXES = {"." + fmt: name for fmt, name in SOURCE_FILES.items()}  # .onnx -> model.onnx, .pt2 -> model.pt2


def _is_model_dir(d: Path) -> bool:
    return (d / "config.yaml").is_file() or bool(version_dirs(d))


def _sources(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix in SUFFIXES)


def resolve_model_dir(model_dir: Path, model_name: str | None, work_dir: Path | None = None) -> tuple[Path, str]:
    """(repository root to serve, what was found). Raises ValueError when nothing servable is there."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise ValueError(f"--model_dir {model_dir} does not exist")
    name = model_name or "model"
    if model_dir.is_dir():
        if version_dirs(model_dir):
            return _one_model(model_dir, name, work_dir, whole_folder=True), f"model folder served as '{name}'"
        subdirs = [d for d in model_dir.iterdir() if d.is_dir() and not d.name.startswith((".", "_"))]
        if any(_is_model_dir(d) for d in subdirs):
            if model_name:
                log.info("--model_dir %s is a model repository: every model keeps its own name (--model_name %s "
                         "not applied)", model_dir, model_name)
            return model_dir, "model repository"
        files = _sources(model_dir)
        if len(files) > 1:
            raise ValueError(f"--model_dir {model_dir} holds {len(files)} model files "
                             f"({', '.join(p.name for p in files)}): put each model in a folder of its own")
        if not files:
            raise ValueError(f"--model_dir {model_dir} holds no model: expected a Kiln repository, a model folder "
                             f"with numeric version folders, or a {' / '.join(SUFFIXES)} file")
        return _one_model(model_dir, name, work_dir, source=files[0]), f"{files[0].name} served as '{name}'"
    if model_dir.suffix not in SUFFIXES:
        raise ValueError(f"--model_dir {model_dir} is a file Kiln cannot serve (expected {' or '.join(SUFFIXES)})")
    return _one_model(model_dir.parent, name, work_dir, source=model_dir), f"{model_dir.name} served as '{name}'"


def _one_model(folder: Path, name: str, work_dir: Path | None, whole_folder: bool = False,
               source: Path | None = None) -> Path:
    root = Path(tempfile.mkdtemp(prefix="kiln-model-dir-", dir=work_dir))
    model = root / name
    if whole_folder:
        model.symlink_to(folder.resolve(), target_is_directory=True)
        return root
    model.mkdir()
    for entry in folder.iterdir():  # config.yaml, labels, data the config refers to
        if entry != source and not entry.name.startswith("."):
            (model / entry.name).symlink_to(entry.resolve())
    (model / "1").mkdir()
    (model / "1" / SUFFIXES[source.suffix]).symlink_to(source.resolve())
    return root
