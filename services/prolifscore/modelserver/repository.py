"""What to serve: the model config (TF Serving's text ModelServerConfig, or every folder under
the model root), each model's version policy, and the versions found on disk.

Versions are found like TF Serving's file-system source: integer folders holding
saved_model.pb under each model's base path; the version policy (latest N / all / specific)
picks the aspired ones.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelEntry:
    """One model of the config: base path, version policy and labels."""

    name: str
    base_path: Path
    policy: str = "latest"  # latest | all | specific
    num_versions: int = 1
    versions: frozenset[int] = frozenset()
    labels: Mapping[str, int] = field(default_factory=dict)

    def aspired(self, available: Iterable[int]) -> set[int]:
        """The versions to serve among those on disk (TF Serving's ServableVersionPolicy)."""
        ordered = sorted(available)
        if self.policy == "all":
            return set(ordered)
        if self.policy == "specific":
            return self.versions & set(ordered)
        return set(ordered[-max(self.num_versions, 1) :]) if ordered else set()


def parse_model_config(
    config: model_server_config_pb2.ModelServerConfig, model_root: Path
) -> dict[str, ModelEntry]:
    """ModelServerConfig -> entries; a relative base_path is taken under the model root."""
    if config.WhichOneof("config") != "model_config_list":
        raise ValueError("the model config must contain a model_config_list")
    entries: dict[str, ModelEntry] = {}
    for mc in config.model_config_list.config:
        if not mc.name or not mc.base_path:
            raise ValueError(f"model config entry without name or base_path: {mc}")
        if mc.model_platform not in ("", "tensorflow"):
            raise ValueError(f"model {mc.name}: platform {mc.model_platform!r} is not supported")
        if mc.name in entries:
            raise ValueError(f"model {mc.name} is configured twice")
        base = Path(mc.base_path)
        if not base.is_absolute():
            base = model_root / base
        policy = mc.model_version_policy.WhichOneof("policy_choice") or "latest"
        entries[mc.name] = ModelEntry(
            name=mc.name,
            base_path=base,
            policy=policy,
            num_versions=mc.model_version_policy.latest.num_versions or 1,
            versions=frozenset(mc.model_version_policy.specific.versions),
            labels=dict(mc.version_labels),
        )
    return entries


def read_model_config(path: Path, model_root: Path) -> dict[str, ModelEntry]:
    """Parse a TF Serving model config file (protobuf text format)."""
    config = text_format.Parse(path.read_text(), model_server_config_pb2.ModelServerConfig())
    return parse_model_config(config, model_root)


def scan_root(model_root: Path) -> dict[str, ModelEntry]:
    """No config file: every (non-hidden) folder under the root, latest version only."""
    if not model_root.is_dir():
        return {}
    return {
        p.name: ModelEntry(p.name, p)
        for p in sorted(model_root.iterdir())
        if p.is_dir() and not p.name.startswith(".")
    }


class ModelConfig:
    """The configured models as of now: the config file, re-read when it changes (a config
    replaced in memory by HandleReloadConfigRequest holds until then), or without a file every
    folder under the model root."""

    def __init__(self, model_root: Path, path: Path | None) -> None:
        self.model_root = model_root
        self.path = path
        self.entries: dict[str, ModelEntry] = {}  # as last returned by `current`
        self._mtime: int | None = None
        self._override: dict[str, ModelEntry] | None = None

    def override(self, entries: dict[str, ModelEntry]) -> None:
        self._override = entries

    def current(self) -> dict[str, ModelEntry]:
        self.entries = self._read()
        return self.entries

    def _read(self) -> dict[str, ModelEntry]:
        if self.path is None:
            return self._override if self._override is not None else scan_root(self.model_root)
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            if self._mtime is None:
                raise  # no config at startup is fatal, as in TF Serving
            log.error(
                "model config file missing; keeping the last one", extra={"path": str(self.path)}
            )
            return self.entries
        if mtime == self._mtime:
            return self._override if self._override is not None else self.entries
        try:
            entries = read_model_config(self.path, self.model_root)
        except Exception as exc:
            if self._mtime is None:
                raise  # a broken config at startup is fatal, as in TF Serving
            log.error("model config not reloaded", extra={"error": str(exc)})
            self._mtime = mtime
            return self.entries
        self._mtime = mtime
        self._override = None
        log.info("model config loaded", extra={"path": str(self.path), "models": sorted(entries)})
        return entries


def version_fingerprint(path: Path) -> tuple[tuple[str, int, int], ...]:
    """Changes when any file of a version changes: a failed load is retried only then."""
    if not path.is_dir():
        return ()
    return tuple(
        sorted(
            (str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns)
            for f in path.rglob("*")
            if f.is_file()
        )
    )
