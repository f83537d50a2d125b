"""The model repository: scan `model_repo/`, build every model, load and unload on request.

Changes to one model are serialized (`ModelTurns`): a load, an unload (and whatever else changes a
model's versions) runs alone, in the order they asked, so exactly one set of versions, each with its
runners, is live per model. A reload builds the new versions while the old ones serve, swaps them
in, then closes the old ones; an unload asked for during a load runs after it. Different models
load in parallel.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from . import heap
from .cache import CompileCache
from .config import NAME_RE, ModelConfig, load_config
from .errors import ConfigError, InvalidInput, NotFound
from .model import ModelVersion
from .source import find_sources

log = logging.getLogger("kiln.repository")


def version_dirs(source_root: Path) -> dict[str, Path]:
    dirs = [p for p in source_root.iterdir() if p.is_dir() and p.name.isdigit()] if source_root.is_dir() else []
    return {p.name: p for p in sorted(dirs, key=lambda p: int(p.name))}


def select_versions(available: dict[str, Path], config: ModelConfig) -> dict[str, Path]:
    policy = config.version_policy
    if policy.specific:
        return {v: p for v, p in available.items() if int(v) in policy.specific}
    if policy.all:
        return available
    keep = list(available)[-(policy.latest or 1):]
    return {v: available[v] for v in keep}


def check_name(name: str) -> None:
    """Model names become paths: refuse anything that could leave the repository."""
    if not NAME_RE.match(name):
        raise InvalidInput(f"invalid model name '{name}'")


def _close(versions) -> None:
    for mv in versions:
        mv.close()


class ModelTurns:
    """One turn at a time per model name, first come first served (a ticket lock per name).

    Whatever changes a model's versions holds its turn for the whole change: `with turns.hold(name):`.
    Names nobody holds or waits for take no memory, so refused names cannot grow it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._tickets: dict[str, list[int]] = {}  # name -> [next ticket, ticket now served]

    @contextmanager
    def hold(self, name: str) -> Iterator[None]:
        with self._cond:
            entry = self._tickets.setdefault(name, [0, 0])
            ticket = entry[0]
            entry[0] += 1
            while entry[1] != ticket:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                entry[1] += 1
                if entry[1] == entry[0]:  # nobody waiting
                    del self._tickets[name]
                self._cond.notify_all()

    def busy(self, name: str) -> bool:
        """Someone holds or waits for this model's turn."""
        with self._cond:
            return name in self._tickets


class ModelRepository:
    def __init__(self, root: Path, cache_dir: Path, only: list[str] | None = None, freeze_heap: bool = False,
                 settle_quiet_s: float = 1.0):
        self.root = Path(root)
        self.freeze_heap = freeze_heap  # service/heap.py: settle the heap whenever the models change
        self.settler = heap.Settler(settle_quiet_s) if freeze_heap else None
        self.cache = CompileCache(cache_dir)
        self.only = set(only or [])
        self.models: dict[str, dict[str, ModelVersion]] = {}
        self.loading_done = threading.Event()
        self.turns = ModelTurns()
        self._lock = threading.RLock()  # guards `models` itself (lookups never wait for a build)

    # -- discovery -----------------------------------------------------------------------------
    def model_dirs(self) -> dict[str, Path]:
        """Folders holding a config.yaml or numeric version folders; hidden and other folders are skipped."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"model repository {self.root} does not exist")
        out = {}
        for d in sorted(self.root.iterdir()):
            if not d.is_dir() or d.name.startswith((".", "_")):
                continue
            if (d / "config.yaml").exists() or version_dirs(d):
                out[d.name] = d
        return out

    def _model_dir(self, name: str) -> Path:
        check_name(name)
        dirs = self.model_dirs()
        if name in dirs:
            return dirs[name]
        for folder, d in dirs.items():  # a config may rename its model
            if self._config_name(d) == name:
                return d
        raise NotFound(f"model '{name}' is not in the repository {self.root}")

    @staticmethod
    def _config_name(model_dir: Path) -> str:
        try:
            return load_config(model_dir / "config.yaml").name or model_dir.name
        except ConfigError:
            return model_dir.name

    def _versions_for(self, model_dir: Path) -> list[ModelVersion]:
        cfg_path = model_dir / "config.yaml"
        try:
            config = load_config(cfg_path) if cfg_path.exists() else ModelConfig()
        except ConfigError as err:
            mv = ModelVersion(model_dir.name, "1", model_dir, ModelConfig(), {}, self.cache)
            mv.fail(f"invalid config: {err}")
            return [mv]
        name = config.name or model_dir.name
        source_root = (model_dir / config.source).resolve() if config.source else model_dir
        versions = select_versions(version_dirs(source_root), config)
        if not versions:
            mv = ModelVersion(name, "1", model_dir, config, {}, self.cache)
            mv.fail(f"no numeric version folder with a model source under {source_root}")
            return [mv]
        return [ModelVersion(name, v, model_dir, config, find_sources(p), self.cache) for v, p in versions.items()]

    # -- lifecycle -----------------------------------------------------------------------------
    def load_all(self) -> None:
        """Build every model; the server reports ready only once this returns."""
        try:
            dirs = self.model_dirs()
            if self.only:
                dirs = {k: v for k, v in dirs.items() if k in self.only}
            log.info("model repository %s: %d model(s): %s", self.root, len(dirs), ", ".join(dirs) or "none")
            for folder in tqdm(list(dirs), desc="compiling models", unit="model", disable=None):
                self._load_dir(dirs[folder])
        except Exception:
            log.exception("loading the model repository failed")
        finally:
            if self.settler is not None:
                self.settler.request()
                self.settler.flush()  # before ready: the collection's pause lands on no request
            self.loading_done.set()

    def _changed(self) -> None:
        """The loaded models changed: settle the heap once the burst of changes is over."""
        if self.settler is not None:
            self.settler.request()

    def settle_pending(self) -> None:
        """Run a heap settle that waits for its burst of changes to end, now."""
        if self.settler is not None:
            self.settler.flush()

    def _load_dir(self, model_dir: Path) -> list[ModelVersion]:
        """Build the model in `model_dir` in its turn, swap the new versions in, close the old ones."""
        with self.turns.hold(self._config_name(model_dir)):
            versions = self._versions_for(model_dir)
            name = versions[0].name
            with self._lock:
                if not self.models.get(name):  # first load: registered now, /ready shows LOADING/COMPILING
                    self.models[name] = {mv.version: mv for mv in versions}
            for mv in versions:
                if mv.state != "FAILED":
                    mv.build()
            with self._lock:
                # Whatever is registered now (in its turn, what was there before this load began, or
                # the new versions themselves on a first load) is replaced and closed.
                replaced = self.models.get(name, {})
                self.models[name] = {mv.version: mv for mv in versions}
            _close(mv for mv in replaced.values() if mv not in versions)
        self._changed()
        return versions

    def load(self, name: str) -> list[ModelVersion]:
        """(Re)load one model from disk; the old versions serve until the new ones are built."""
        return self._load_dir(self._model_dir(name))

    def unload(self, name: str) -> None:
        check_name(name)
        with self.turns.hold(name):  # after a load of this model in progress
            with self._lock:
                versions = self.models.pop(name, None)
            if versions is None:
                raise NotFound(f"model '{name}' is not loaded")
            _close(versions.values())
            del versions  # the settle's collection must find the model unreferenced
        self._changed()

    def close(self) -> None:
        if self.settler is not None:
            self.settler.close()
        with self._lock:
            all_versions = [mv for vs in self.models.values() for mv in vs.values()]
            self.models = {}
        _close(all_versions)
        self.cache.close()
        if self.freeze_heap:
            heap.release()

    # -- lookup --------------------------------------------------------------------------------
    def get(self, name: str, version: str | None = None) -> ModelVersion:
        versions = self.models.get(name)
        if not versions:
            raise NotFound(f"unknown model '{name}'")
        if version is None or version == "":
            ready = [mv for mv in versions.values() if mv.ready]
            return max(ready or versions.values(), key=lambda mv: int(mv.version))
        if version not in versions:
            raise NotFound(f"unknown version '{version}' of model '{name}' (have {', '.join(versions)})")
        return versions[version]

    def versions(self, name: str) -> list[str]:
        return list(self.models.get(name, {}))

    def ready(self) -> bool:
        """Server readiness: loading finished and every model that did not fail is READY."""
        if not self.loading_done.is_set():
            return False
        return all(mv.ready for vs in list(self.models.values()) for mv in vs.values() if mv.state != "FAILED")

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        out = []
        loaded = dict(self.models)
        for name in sorted(set(loaded) | {self._safe_name(d) for d in self._safe_dirs()}):
            versions = loaded.get(name)
            if not versions:
                if not ready_only:
                    out.append({"name": name, "state": "UNAVAILABLE", "reason": "unloaded"})
                continue
            for mv in versions.values():
                if ready_only and not mv.ready:
                    continue
                out.append({"name": name, "version": mv.version, "state": mv.state, "reason": mv.reason})
        return out

    def _safe_dirs(self) -> list[Path]:
        try:
            return list(self.model_dirs().values())
        except FileNotFoundError:
            return []

    def _safe_name(self, d: Path) -> str:
        return self._config_name(d)
