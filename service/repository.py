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
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from . import heap, metrics
from .cache import CompileCache
from .config import NAME_RE, ModelConfig, load_config
from .errors import ConfigError, InvalidInput, NotFound, Unavailable
from .model import ModelVersion
from .source import find_sources

log = logging.getLogger("kiln.repository")


def version_dirs(source_root: Path) -> dict[str, Path]:
    dirs = [p for p in source_root.iterdir() if p.is_dir() and p.name.isdigit()] if source_root.is_dir() else []
    return {p.name: p for p in sorted(dirs, key=lambda p: int(p.name))}


def select_versions(available: dict[str, Path], config: ModelConfig) -> dict[str, Path]:
    """The versions to serve: the version_policy's, plus those a rollout names (its canary, its
    shadow and its stable version, by default the highest one that is neither)."""
    policy = config.version_policy
    if policy.specific:
        keep = {v for v in available if int(v) in policy.specific}
    elif policy.all:
        keep = set(available)
    else:
        keep = set(list(available)[-(policy.latest or 1):])
    keep |= rollout_versions(available, config)
    return {v: p for v, p in available.items() if v in keep}


def rollout_versions(available: dict[str, Path], config: ModelConfig) -> set[str]:
    spec = config.rollout
    if spec is None:
        return set()
    named = {str(part.version) for part in (spec.canary, spec.shadow) if part is not None}
    if spec.stable is not None:
        named.add(str(spec.stable))
    elif named:
        below = [v for v in available if v not in named]
        if below:
            named.add(below[-1])
    return named & set(available)


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
        # Called with a model name after its set of versions changed (service/rollout.py listens).
        self.listeners: list = []
        # A rebuild of a serving version that failed: (model, version) -> reason; the old build serves.
        self.failed_successors: dict[tuple[str, str], str] = {}
        # How long a removed version's in-flight requests may take before it is closed anyway.
        self.drain_timeout_s = 60.0
        # --model-control-mode (Triton's names): load/unload on request only in explicit mode.
        self.control_mode = "explicit"

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
                self._load_dir(dirs[folder])  # notifies the listeners
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
        """Build the model in `model_dir` in its turn, swap the new versions in, drain and close the old ones."""
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
                # the new versions themselves on a first load) is replaced, drained and closed — except,
                # as in Triton, a version whose new build failed while its previous build was READY:
                # that one keeps serving and `failed_successors` says why.
                replaced = self.models.get(name, {})
                serving, failed_new = {}, []
                for mv in versions:
                    old = replaced.get(mv.version)
                    if mv.state == "FAILED" and old is not None and old is not mv and old.ready:
                        serving[mv.version] = old
                        self.failed_successors[(name, mv.version)] = mv.reason
                        failed_new.append(mv)
                    else:
                        serving[mv.version] = mv
                        self.failed_successors.pop((name, mv.version), None)
                for v in replaced:
                    if v not in serving:
                        self.failed_successors.pop((name, v), None)
                self.models[name] = serving
            self._drain_close_all(mv for mv in replaced.values() if all(mv is not s for s in serving.values()))
            for mv in failed_new:  # closing a build drops its version's series: the old build publishes again
                mv.close()
                self._republish(name, mv.version)
            del replaced, serving
        self._notify(name)
        self._changed()
        return versions

    def _check_control(self, action: str) -> None:
        """As Triton: load/unload on request only in explicit mode (UNAVAILABLE otherwise)."""
        mode = self.control_mode
        if mode != "explicit":
            why = ": in poll mode the repository's contents decide" if mode == "poll" else ""
            raise Unavailable(f"explicit model load / unload is not allowed in model control mode '{mode}' "
                              f"({action} refused; start with --model-control-mode explicit{why})")

    def load(self, name: str) -> list[ModelVersion]:
        """(Re)load one model from disk; the old versions serve until the new ones are built, and a
        version whose new build fails keeps its old build serving (the call still reports the failure)."""
        self._check_control("load")
        return self._load_dir(self._model_dir(name))

    def unload(self, name: str) -> None:
        self._check_control("unload")
        check_name(name)
        with self.turns.hold(name):  # after a load of this model in progress
            with self._lock:
                versions = self.models.pop(name, None)
            if versions is None:
                raise NotFound(f"model '{name}' is not loaded")
            self._drain_close_all(versions.values())
            del versions  # the settle's collection must find the model unreferenced
        self._notify(name)
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

    # -- one version at a time, in the model's turn (poll mode: service/poll.py) -------------------
    def _notify(self, name: str) -> None:
        for listener in list(self.listeners):
            try:
                listener(name)
            except Exception:  # a listener must not fail a load
                log.exception("model %s: a repository listener failed", name)

    def install_version(self, mv: ModelVersion) -> ModelVersion:
        """Build `mv` and serve it beside the model's other versions.

        A new version number is listed (LOADING, COMPILING, ...) while it builds and stays listed if
        it fails, with its reason. A new build of a version already served replaces the old build
        only once READY (the old one drains, then closes); if it fails, the old build keeps serving
        and `failed_successors` says why."""
        name, v = mv.name, mv.version
        with self.turns.hold(name):
            with self._lock:
                old = self.models.get(name, {}).get(v)
                if old is None:
                    self._put(name, mv)
            if mv.state != "FAILED":
                mv.build()
            with self._lock:
                if mv.ready:
                    self._put(name, mv)
                    self.failed_successors.pop((name, v), None)
                elif old is not None:
                    self.failed_successors[(name, v)] = mv.reason
            if old is not None:
                if mv.ready:
                    self.drain_close(old)
                else:
                    mv.close()
                    self._republish(name, v)
            del old  # the settle's collection must find a replaced build unreferenced
        self._notify(name)
        if mv.ready:  # a failed build left nothing long-lived to freeze, nothing frozen to free
            self._changed()
        return mv

    def set_rollout_config(self, name: str, rollout) -> None:
        """A config.yaml whose only change is `rollout:`: the served versions take it without a rebuild."""
        with self.turns.hold(name):
            for mv in self.models.get(name, {}).values():
                mv.config = mv.config.model_copy(update={"rollout": rollout})
        self._notify(name)

    def retire_versions(self, name: str, versions: list[str]) -> list[str]:
        """Stop routing to these versions, let their in-flight requests finish, then close them;
        returns the versions that were loaded."""
        with self.turns.hold(name):
            with self._lock:
                current = self.models.get(name, {})
                removed = [current[v] for v in versions if v in current]
                rest = {v: mv for v, mv in current.items() if v not in versions}
                if rest:
                    self.models[name] = rest
                else:
                    self.models.pop(name, None)
                for v in versions:
                    self.failed_successors.pop((name, v), None)
            self._drain_close_all(removed)
            gone = [mv.version for mv in removed]
            del removed
        if gone:
            self._notify(name)
            self._changed()
        return gone

    def _put(self, name: str, mv: ModelVersion) -> None:
        """Copy on write, ordered by version number: readers iterate the dict they got."""
        current = {**self.models.get(name, {}), mv.version: mv}
        self.models[name] = dict(sorted(current.items(), key=lambda kv: int(kv[0])))

    def _drain_close_all(self, versions) -> None:
        for mv in versions:
            self.drain_close(mv)

    def drain_close(self, mv: ModelVersion) -> None:
        """Close a version no longer routed to once its in-flight requests are answered.

        A request picks its version and counts itself in flight in one step of the event loop, so a
        request that found the version before it was removed is counted within a few milliseconds."""
        time.sleep(0.05)
        deadline = time.monotonic() + self.drain_timeout_s
        while mv.inflight > 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        if mv.inflight > 0:
            log.warning("model %s v%s: closed with %d request(s) still in flight after %.0f s", mv.name,
                        mv.version, mv.inflight, self.drain_timeout_s)
        mv.close()
        self._republish(mv.name, mv.version)

    def _republish(self, name: str, version: str) -> None:
        """Closing a build drops its version's state series; a build of the same version that serves
        on publishes its own again."""
        current = self.models.get(name, {}).get(version)
        if current is not None:
            metrics.set_model_state(name, version, current.backend, current.precision, current.state)
            if current.parity is not None:
                for out in current.parity.outputs:
                    metrics.PARITY.labels(name, version, out.output).set(out.max_abs_error)
            if current.parity_verdict:
                metrics.PARITY_VERIFIED.labels(name, version).set(1 if current.parity_verdict == "verified" else 0)

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
        """Server readiness: loading finished and every model that did not fail is READY. A model
        with a READY version stays ready while another version of it builds (a poll-mode update must
        not take the pod out of its Service)."""
        if not self.loading_done.is_set():
            return False
        for vs in list(self.models.values()):
            versions = list(vs.values())
            if not any(mv.ready for mv in versions) and not all(mv.state == "FAILED" for mv in versions):
                return False
        return True

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
                reason = mv.reason
                if (name, mv.version) in self.failed_successors:
                    reason = f"serving the previous build; the new one FAILED: {self.failed_successors[(name, mv.version)]}"
                out.append({"name": name, "version": mv.version, "state": mv.state, "reason": reason})
        return out

    def _safe_dirs(self) -> list[Path]:
        try:
            return list(self.model_dirs().values())
        except FileNotFoundError:
            return []

    def _safe_name(self, d: Path) -> str:
        return self._config_name(d)
