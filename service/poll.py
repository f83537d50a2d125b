"""`--model-control-mode poll`: rescan the model repository and rebuild only what changed.

Every `--repository-poll-secs` the scanner fingerprints each model folder: its configuration (config.yaml
and every other file outside the version folders: calibration data, labels) and each numeric version
folder, by content (SHA-256). A scan stats every file and hashes only the files whose size or mtime
changed since the last scan, so an unchanged repository costs one `stat` per file: no hashing, no
recompile, no heap settle.

What a change does (through the repository's one-version-at-a-time operations, service/repository.py):
- a new version folder: built (compile → gates → warm-up) while the serving versions serve; once READY
  it serves, and versions the version_policy no longer keeps drain and unload. If it fails a gate it
  never takes traffic: it is listed FAILED with its reason, and the old versions keep serving;
- a changed version folder: rebuilt; the new build replaces the old one only once READY;
- a changed configuration: every version of that model rebuilt the same way (and only that model); an
  invalid one is refused with its error in the log and the model keeps serving as it was. A change of
  `rollout:` alone rebuilds nothing: the new rollout applies at once (service/rollout.py);
- a removed version folder (or model folder): no new requests go to it, its in-flight requests finish,
  then it unloads.
A version that failed is not rebuilt until its files or its configuration change again.

A folder is acted on only once two scans in a row find it the same: a file still being written (a
model being copied in, a config.yaml an editor truncates and then writes) is read at least one poll
interval later, whole, and a half-written state is never built nor refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from . import metrics
from .config import ModelConfig, load_config
from .errors import ConfigError
from .model import ModelVersion
from .repository import ModelRepository, select_versions, version_dirs
from .source import find_sources

log = logging.getLogger("kiln.poll")


class ContentHasher:
    """SHA-256 of files, recomputed only for files whose (size, mtime) changed since they were last hashed."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[int, int, str]] = {}
        self._configs: dict[str, tuple[ModelConfig | None, str]] = {}  # config.yaml digest -> parsed
        self.files_hashed = 0  # hashes computed (tests: an unchanged scan computes none)

    def file(self, path: Path, st: os.stat_result) -> str:
        key = str(path)
        known = self._known.get(key)
        if known is not None and known[0] == st.st_size and known[1] == st.st_mtime_ns:
            return known[2]
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        self.files_hashed += 1
        self._known[key] = (st.st_size, st.st_mtime_ns, digest)
        return digest

    def config(self, path: Path) -> tuple[ModelConfig | None, str]:
        """(config, "") or (None, the error) for a config.yaml, parsed again only when its content changed."""
        try:
            digest = self.file(path, path.stat())
        except FileNotFoundError:
            return ModelConfig(), ""
        if digest not in self._configs:
            try:
                self._configs[digest] = (load_config(path), "")
            except ConfigError as err:
                self._configs[digest] = (None, str(err))
        return self._configs[digest]

    def tree(self, root: Path, skip: set[Path] = frozenset()) -> str:
        """One digest of every file under root (names and contents), hidden files and `skip` excepted."""
        h = hashlib.sha256()
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and here / d not in skip)
            for name in sorted(filenames):
                path = here / name
                if name.startswith(".") or path in skip:
                    continue
                try:
                    st = path.stat()
                    digest = self.file(path, st)
                except FileNotFoundError:  # removed while scanning: the next scan sees the result
                    continue
                h.update(str(path.relative_to(root)).encode() + b"\0" + digest.encode() + b"\n")
        return h.hexdigest()

    def forget(self, root: Path) -> None:
        prefix = str(root) + os.sep
        for key in [k for k in self._known if k.startswith(prefix)]:
            del self._known[key]


@dataclass
class ModelScan:
    """One model folder as the scan found it."""

    folder: Path
    config_digest: str
    config: ModelConfig | None
    config_error: str = ""
    source_root: Path | None = None
    versions: dict[str, str] = field(default_factory=dict)  # version -> content digest
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def fingerprint(self) -> tuple:
        rollout = self.config.rollout.model_dump_json() if self.config and self.config.rollout else ""
        return self.config_digest, rollout, tuple(sorted(self.versions.items()))

    @property
    def name(self) -> str:
        return (self.config.name if self.config and self.config.name else None) or self.folder.name

    def selected(self) -> dict[str, Path]:
        return select_versions(self.paths, self.config) if self.config else {}


def scan_model(folder: Path, hasher: ContentHasher) -> ModelScan:
    """The folder's versions and configuration as digests. The configuration digest covers every file
    outside the version folders and config.yaml's settings except `rollout:`: a rollout edit re-routes
    requests, it rebuilds nothing."""
    cfg_path = folder / "config.yaml"
    config, error = hasher.config(cfg_path)
    source_root = (folder / config.source).resolve() if config and config.source else folder
    paths = version_dirs(source_root)
    skip = (set(paths.values()) if source_root == folder else set()) | {cfg_path}
    digest = hashlib.sha256(hasher.tree(folder, skip).encode())
    if config is not None:
        digest.update(config.model_dump_json(exclude={"rollout"}).encode())
    else:
        digest.update(error.encode())
    scan = ModelScan(folder, digest.hexdigest(), config, error, source_root, paths=paths)
    scan.versions = {v: hasher.tree(p) for v, p in paths.items()}
    return scan


class RepositoryPoller:
    """The poll loop: scan, compare with the last scan, apply what changed (one change at a time)."""

    def __init__(self, repo: ModelRepository, interval_s: float):
        self.repo = repo
        self.interval_s = interval_s
        self.hasher = ContentHasher()
        self.scans: dict[Path, ModelScan] = {}  # the last scan applied, per model folder
        self.latest: dict[Path, ModelScan] = {}  # the last scan seen, applied or still settling
        self.rollouts: dict[str, object] = {}  # model -> the config.yaml rollout it serves with
        # (model, version) -> digest of the version folder and of the config it was last built from
        self.built: dict[tuple[str, str], tuple[str, str]] = {}
        self.polls = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def baseline(self) -> None:
        """Fingerprint the repository as the startup load is about to read it."""
        for folder in self._folders():
            scan = scan_model(folder, self.hasher)
            self.scans[folder] = self.latest[folder] = scan
            self.rollouts[scan.name] = scan.config.rollout if scan.config else None
            for v in scan.selected():
                self.built[(scan.name, v)] = (scan.versions[v], scan.config_digest)

    def start(self) -> None:
        for change in ("added", "changed", "config", "rollout", "removed", "superseded", "refused"):
            metrics.REPOSITORY_CHANGES.labels(change)  # 0, not "no data", until the first change
        self._thread = threading.Thread(target=self._run, name="kiln-repository-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)

    def _run(self) -> None:
        self.repo.loading_done.wait()
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # the loop must survive anything a repository edit can do
                log.exception("repository poll failed")

    # -- one poll ------------------------------------------------------------------------------
    def _folders(self) -> list[Path]:
        try:
            dirs = self.repo.model_dirs()
        except FileNotFoundError:
            return []
        only = self.repo.only
        return [d for name, d in dirs.items() if not only or name in only]

    def poll(self) -> int:
        """Scan once and apply the changes; returns how many changes were applied."""
        self.polls += 1
        metrics.REPOSITORY_POLLS.inc()
        changes = 0
        seen = set()
        for folder in self._folders():
            if self._stop.is_set():
                break
            seen.add(folder)
            scan = scan_model(folder, self.hasher)
            last, self.latest[folder] = self.latest.get(folder), scan
            if last is None or last.fingerprint != scan.fingerprint:
                continue  # changed since the last scan: applied once a scan finds it settled
            changes += self._apply(scan, self.scans.get(folder))
            self.scans[folder] = scan
        for folder in [f for f in self.latest if f not in seen]:
            del self.latest[folder]
            gone = self.scans.pop(folder, None)
            if gone is None:  # it came and went between two scans: nothing was built from it
                continue
            log.info("poll: model folder %s removed: unloading %s after its in-flight requests", folder, gone.name)
            self.hasher.forget(folder)
            self.rollouts.pop(gone.name, None)
            changes += self._retire(gone.name, self.repo.versions(gone.name), "removed")
        return changes

    def _apply(self, scan: ModelScan, prev: ModelScan | None) -> int:
        name = scan.name
        if scan.config is None:
            if prev is None or prev.config_digest != scan.config_digest:
                log.error("poll: %s: the new configuration is refused, the model serves as before: %s",
                          name, scan.config_error)
                metrics.REPOSITORY_CHANGES.labels("refused").inc()
            return 0
        changes = 0
        loaded = self.repo.models.get(name, {})
        selected = scan.selected()
        # Compared with the rollout applied, not with the last scan: a change is never lost to a scan
        # in between that was refused or rebuilt.
        rollout = scan.config.rollout
        if loaded and name in self.rollouts and self.rollouts[name] != rollout:
            log.info("poll: %s: rollout changed in config.yaml: %s", name,
                     rollout.model_dump(exclude_none=True) if rollout else "none")
            metrics.REPOSITORY_CHANGES.labels("rollout").inc()
            self.repo.set_rollout_config(name, rollout)
            changes += 1
        self.rollouts[name] = rollout
        for v, path in selected.items():
            built_from = (scan.versions[v], scan.config_digest)
            if self.built.get((name, v)) == built_from and v in loaded:
                continue
            kind = "added" if v not in loaded else ("config" if self.built.get((name, v), ("",))[0]
                                                   == scan.versions[v] else "changed")
            log.info("poll: %s v%s %s: building it while the serving versions serve", name, v,
                     {"added": "added", "config": "configuration changed", "changed": "changed"}[kind])
            metrics.REPOSITORY_CHANGES.labels(kind).inc()
            self.built[(name, v)] = built_from
            mv = self.repo.install_version(
                ModelVersion(name, v, scan.folder, scan.config, find_sources(path), self.repo.cache))
            changes += 1
            if not mv.ready:
                log.error("poll: %s v%s FAILED (%s); it takes no traffic", name, v, mv.reason)
        # Versions no longer on disk go at once; versions the policy no longer keeps go once a kept
        # version serves (the serving version keeps serving until its successor is READY).
        loaded = self.repo.models.get(name, {})
        gone = [v for v in loaded if v not in scan.paths]
        if gone:
            changes += self._retire(name, gone, "removed")
        successor_ready = any(mv.ready for v, mv in loaded.items() if v in selected)
        extra = [v for v in loaded if v in scan.paths and v not in selected]
        if extra and successor_ready:
            changes += self._retire(name, extra, "superseded")
        return changes

    def _retire(self, name: str, versions: list[str], why: str) -> int:
        if not versions:
            return 0
        log.info("poll: %s v%s %s: draining, then unloading", name, ",".join(versions), why)
        metrics.REPOSITORY_CHANGES.labels(why).inc()
        for v in versions:
            self.built.pop((name, v), None)
        self.repo.retire_versions(name, versions)
        return 1
