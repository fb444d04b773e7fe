"""Versions on disk -> loaded servables, for every configured model.

Versions are re-scanned every `poll_s` (and the config file re-read when it changes); the
version policy picks the aspired ones. Loading runs on the poll thread, never on a request; a
new version is published only once loaded (and warmed up), and requests already running keep
the version they resolved.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.config import model_server_config_pb2

from prolifscore.core.models.export import complete_versions
from prolifscore.modelserver.batching import BatchScheduler
from prolifscore.modelserver.errors import ServingError
from prolifscore.modelserver.repository import (
    ModelConfig,
    ModelEntry,
    parse_model_config,
    version_fingerprint,
)
from prolifscore.modelserver.servable import Servable
from prolifscore.modelserver.warmup import replay_warmup

log = logging.getLogger(__name__)
_STATE = get_model_status_pb2.ModelVersionStatus


@dataclass
class VersionState:
    """A version's ModelVersionStatus: its state and, after a failed load, the error."""

    state: int
    error: str = ""
    code: int = 0


class VersionStates:
    """Every version's state as GetModelStatus reports it: set by the poll thread, read by
    requests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[str, dict[int, VersionState]] = {}

    def set(self, name: str, version: int, state: VersionState) -> None:
        with self._lock:
            self._states.setdefault(name, {})[version] = state

    def status(self, name: str, version: int | None) -> list[tuple[int, VersionState]]:
        """(version, state) of one version of `name`, or of all, with TF Serving's errors."""
        with self._lock:
            states = dict(self._states.get(name, {}))
        if version is not None:
            if version not in states:
                raise ServingError(
                    grpc.StatusCode.NOT_FOUND, f"Could not find version {version} of model {name}"
                )
            return [(version, states[version])]
        if not states:
            raise ServingError(
                grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {name}"
            )
        return sorted(states.items())


class ModelManager:
    """Keeps the aspired versions of every configured model loaded.

    `served` is an immutable snapshot replaced as a whole after each change, so a request reads
    it without locking and keeps its Servable even if the next poll unloads that version.
    A version that fails to load is retried when its files change; meanwhile the previous
    versions stay served (the failed one does not count as available for the policy).
    """

    def __init__(
        self,
        model_root: Path,
        config_path: Path | None,
        *,
        warmup: bool = True,
        warmup_iterations: int = 1,
        batcher: BatchScheduler | None = None,
    ) -> None:
        self.model_root = Path(model_root)
        self.config = ModelConfig(self.model_root, config_path)
        self.warmup = warmup
        self.warmup_iterations = warmup_iterations
        self.batcher = batcher
        self.served: dict[str, dict[int, Servable]] = {}
        self.entries: dict[str, ModelEntry] = {}
        self.states = VersionStates()
        self._failed: dict[tuple[str, int], Any] = {}
        self._rejected: dict[str, ModelEntry] | None = None  # a config file whose labels failed
        self._poll_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reload_config(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        """ModelService.HandleReloadConfigRequest: replace the config in memory and apply it
        (the new models and versions are loaded when it returns)."""
        entries = parse_model_config(config, self.model_root)  # a bad config fails fast
        with self._poll_lock:
            self.check_labels(entries)
            self.config.override(entries)
        self.poll()

    def check_labels(self, entries: dict[str, ModelEntry]) -> None:
        """TF Serving's rule for version labels (ServerCore::UpdateModelVersionLabelMap, with
        --allow_version_labels_for_unavailable_models as the Kubernetes deployment should run
        it): a new label may name a version not loaded yet, but moving a label needs its new
        version AVAILABLE. Else the whole config is refused."""
        for name, entry in entries.items():
            before = self.entries[name].labels if name in self.entries else {}
            for label, version in entry.labels.items():
                moved = label in before and before[label] != version
                if moved and version not in self.served.get(name, {}):
                    raise ServingError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"Request to assign label to version {version} of model {name}, "
                        "which is not currently available for inference",
                    )

    # -- polling
    def start(self, poll_s: float) -> None:
        self.poll()  # like TF Serving: the initial versions load before the port serves

        def loop() -> None:
            while not self._stop.wait(poll_s):
                try:
                    self.poll()
                except Exception:
                    log.exception("model poll failed")

        self._thread = threading.Thread(target=loop, name="model-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def poll(self) -> None:
        """One scan: load new aspired versions, then unload the ones no longer aspired.

        Availability first, like TF Serving's default policy: an old version is unloaded only
        once every aspired version is loaded (or when its folder is gone).
        """
        with self._poll_lock:
            entries = self._current_entries()
            self.entries = entries
            served = {name: dict(versions) for name, versions in self.served.items()}
            for name in [n for n in served if n not in entries]:
                for version in list(served[name]):
                    self._unload(served, name, version)
                served.pop(name)
            for name, entry in entries.items():
                current = served.setdefault(name, {})
                on_disk = complete_versions(entry.base_path)
                aspired = self._load_aspired(entry, on_disk, served)
                if aspired is None:
                    return
                ready = aspired <= set(current)
                for version in sorted(set(current) - aspired):
                    if ready or version not in on_disk:
                        self._unload(served, name, version)
                if not current:
                    served.pop(name)
            self._publish(served)

    def _load_aspired(
        self, entry: ModelEntry, on_disk: list[int], served: dict[str, dict[int, Servable]]
    ) -> set[int] | None:
        """Load the versions the policy picks. A version that fails leaves the policy's choice,
        so the next one (the previous version) loads in its place in the same scan rather than
        the model being dropped for a broken version. None: the server is stopping."""
        current = served[entry.name]
        while True:
            aspired = entry.aspired(v for v in on_disk if not self._still_failed(entry, v))
            missing = sorted(aspired - set(current))
            if not missing:
                return aspired
            for version in missing:
                if self._stop.is_set():
                    return None
                servable = self._load(entry, version)
                if servable is not None:
                    current[version] = servable
                    self._publish(served)

    def _current_entries(self) -> dict[str, ModelEntry]:
        """The config to apply now: a changed config file whose labels break TF Serving's rule
        is refused (logged once) and the previous config stays."""
        entries = self.config.current()
        if entries is self.entries or not self.entries:
            return entries
        if entries is self._rejected:
            return self.entries
        try:
            self.check_labels(entries)
        except ServingError as exc:
            log.error("model config not applied", extra={"error": exc.message})
            self._rejected = entries
            return self.entries
        return entries

    def _publish(self, served: dict[str, dict[int, Servable]]) -> None:
        """Swap in a fresh snapshot: requests never see a dict that is being changed."""
        self.served = {name: dict(versions) for name, versions in served.items()}

    def _still_failed(self, entry: ModelEntry, version: int) -> bool:
        key = (entry.name, version)
        if key not in self._failed:
            return False
        if self._failed[key] == version_fingerprint(entry.base_path / str(version)):
            return True
        del self._failed[key]  # files changed: try again
        return False

    def _load(self, entry: ModelEntry, version: int) -> Servable | None:
        path = entry.base_path / str(version)
        self.states.set(entry.name, version, VersionState(_STATE.LOADING))
        started = time.perf_counter()
        servable: Servable | None = None
        try:
            servable = Servable(entry.name, version, path, self.batcher)
            if self.warmup:
                replay_warmup(servable, self.warmup_iterations)
        except Exception as exc:
            if servable is not None:
                servable.close()
            self._failed[(entry.name, version)] = version_fingerprint(path)
            code = exc.code if isinstance(exc, ServingError) else grpc.StatusCode.UNKNOWN
            why = f"{code.name}: {exc}" if isinstance(exc, ServingError) else str(exc)
            message = f"Loading servable: {{name: {entry.name} version: {version}}} failed: {why}"
            self.states.set(
                entry.name, version, VersionState(_STATE.END, message[:2000], code.value[0])
            )
            log.error(
                "model load failed",
                extra={"model": entry.name, "version": version, "error": str(exc)[:500]},
            )
            return None
        self.states.set(entry.name, version, VersionState(_STATE.AVAILABLE))
        log.info(
            "model loaded",
            extra={
                "model": entry.name,
                "version": version,
                "load_s": round(time.perf_counter() - started, 3),
                "trained": servable.metadata.get("trained"),
            },
        )
        return servable

    def _unload(self, served: dict[str, dict[int, Servable]], name: str, version: int) -> None:
        servable = served[name].pop(version, None)
        if servable is not None:
            servable.close()
        self.states.set(name, version, VersionState(_STATE.END))
        log.info("model unloaded", extra={"model": name, "version": version})

    # -- request side
    def resolve(self, spec: Any) -> Servable:
        """ModelSpec -> Servable, with ServerCore::ServableRequestFromModelSpec's errors."""
        name = spec.name
        if not name:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "ModelSpec has no name specified.")
        versions = self.served.get(name, {})
        choice = spec.WhichOneof("version_choice")
        if choice == "version_label":
            entry = self.entries.get(name)
            label = spec.version_label
            if entry is None or label not in entry.labels:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Unrecognized servable version label: {label}",
                )
            wanted: int | None = entry.labels[label]
        elif choice == "version":
            wanted = spec.version.value
        else:
            wanted = None
        if wanted is None:
            if not versions:
                raise ServingError(
                    grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({name})"
                )
            return versions[max(versions)]
        if wanted not in versions:
            raise ServingError(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found for request: Specific({name}, {wanted})",
            )
        return versions[wanted]
