"""`prolifscore models`: the served models' versions and version labels, kept in the model config
file both model servers read (TF Serving's text ModelServerConfig, PROLIF_MODEL_CONFIG).

    prolifscore models list                       config, versions on disk, labels, served states
    prolifscore models promote LABEL VERSION      point LABEL of --model at VERSION
    prolifscore models rollback [LABEL]           restore LABEL's previous version

promote and rollback rewrite the file atomically (its leading comment kept), append the change
to `<config>.history` (what rollback undoes), and make every --server reload it through
ModelService.HandleReloadConfigRequest, which TF Serving and the local server both answer. The
file is written first, so TF Serving's own config poll keeps the change. A label may only move
to a version that is loaded (TF Serving's rule): when the version policy lists specific
versions, the new one is added and loaded first, then the label moves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

_LOAD_TIMEOUT_S = 300.0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("PROLIF_MODEL_CONFIG") or None,
        help="model config file (default: PROLIF_MODEL_CONFIG)",
    )
    common.add_argument(
        "--model-root",
        type=Path,
        default=Path(os.environ.get("PROLIF_MODEL_ROOT", "data/models")),
        help="where relative base paths lie (default: PROLIF_MODEL_ROOT or data/models)",
    )
    common.add_argument(
        "--server",
        action="append",
        help="model server gRPC address to reload (repeatable; default: PROLIF_MODEL_SERVER "
        "or 127.0.0.1:8500)",
    )
    common.add_argument(
        "--no-reload", action="store_true", help="only edit the file (servers poll it)"
    )
    common.add_argument(
        "--model",
        default=os.environ.get("PROLIF_TUMOR_MODEL", "resnet50"),
        help="model name (default: PROLIF_TUMOR_MODEL or resnet50)",
    )
    p = sub.add_parser("models", help="model versions and version labels (stable, canary, ...)")
    msub = p.add_subparsers(dest="models_command", required=True)
    ls = msub.add_parser("list", parents=[common], help="versions, labels and served states")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=run_list)
    promote = msub.add_parser("promote", parents=[common], help="point a label at a version")
    promote.add_argument("label")
    promote.add_argument("version", type=int)
    promote.set_defaults(func=run_promote)
    rollback = msub.add_parser(
        "rollback", parents=[common], help="restore a label's previous version"
    )
    rollback.add_argument("label", nargs="?", help="default: the last label promoted")
    rollback.set_defaults(func=run_rollback)


# -- the config file and its history
def read_config(path: Path) -> Any:
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    return text_format.Parse(path.read_text(), model_server_config_pb2.ModelServerConfig())


def write_config(path: Path, config: Any) -> None:
    """Atomic replace (a server polling the file never reads half of it), the file's leading
    comment block kept."""
    from google.protobuf import text_format

    from prolifscore.core.wsi.tfrecord import write_atomic

    lines = path.read_text().splitlines() if path.exists() else []
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join([*header, text_format.MessageToString(config).rstrip()]) + "\n"
    write_atomic(path, text.encode())


def model_entry(config: Any, name: str, path: Path) -> Any:
    for entry in config.model_config_list.config:
        if entry.name == name:
            return entry
    names = ", ".join(e.name for e in config.model_config_list.config) or "none"
    raise ValueError(f"model {name} is not in {path} (it lists: {names}); choose with --model")


def history_path(config_path: Path) -> Path:
    return config_path.with_name(config_path.name + ".history")


def read_history(config_path: Path) -> list[dict[str, Any]]:
    path = history_path(config_path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_history(config_path: Path, record: dict[str, Any]) -> None:
    """One JSON line per label change, flushed and fsynced before the servers reload."""
    record = {"id": len(read_history(config_path)) + 1, "at": _now(), **record}
    with open(history_path(config_path), "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def open_promotions(history: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    """The promotions of `model` not rolled back yet, oldest first: rollback's stack."""
    stack: list[dict[str, Any]] = []
    for record in history:
        if record.get("model") != model:
            continue
        if record["op"] == "promote":
            stack.append(record)
        elif record["op"] == "rollback":
            stack = [r for r in stack if r["id"] != record["undoes"]]
    return stack


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# -- the servers
class Servers:
    """The model servers to reload (TF Serving or local), over TF Serving's ModelService."""

    def __init__(self, addresses: list[str]) -> None:
        from tensorflow_serving.apis import model_service_pb2_grpc

        from prolifscore.core.runtime.settings import RuntimeSettings, load
        from prolifscore.core.runtime.tls import open_channel

        tls = load(RuntimeSettings)  # PROLIF_TLS_*: mutual TLS where the servers require it
        self.addresses = addresses
        self._channels = [open_channel(a, tls) for a in addresses]
        self._stubs = [model_service_pb2_grpc.ModelServiceStub(c) for c in self._channels]

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def status(self, model: str) -> list[dict[int, str]]:
        """Per server, version -> state name ({} when the model is unknown there)."""
        import grpc
        from tensorflow_serving.apis import get_model_status_pb2

        states = get_model_status_pb2.ModelVersionStatus.State
        out = []
        for address, stub in zip(self.addresses, self._stubs, strict=True):
            request = get_model_status_pb2.GetModelStatusRequest()
            request.model_spec.name = model
            try:
                response = stub.GetModelStatus(request, timeout=10)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                    out.append({})
                    continue
                raise RuntimeError(f"model server {address}: {_details(exc)}") from exc
            out.append({s.version: states.Name(s.state) for s in response.model_version_status})
        return out

    def reload(self, config: Any) -> None:
        """HandleReloadConfigRequest on every server; its refusal (TF Serving's words) raises."""
        import grpc
        from tensorflow_serving.apis import model_management_pb2

        request = model_management_pb2.ReloadConfigRequest(config=config)
        for address, stub in zip(self.addresses, self._stubs, strict=True):
            try:
                stub.HandleReloadConfigRequest(request, timeout=_LOAD_TIMEOUT_S)
            except grpc.RpcError as exc:
                raise RuntimeError(
                    f"model server {address} refused the config: {_details(exc)}"
                ) from exc

    def wait_available(self, model: str, version: int) -> None:
        """Until every server reports `version` of `model` AVAILABLE (it loads in the
        background after a reload); a failed load raises."""
        deadline = time.monotonic() + _LOAD_TIMEOUT_S
        while True:
            states = self.status(model)
            if all(s.get(version) == "AVAILABLE" for s in states):
                return
            for address, s in zip(self.addresses, states, strict=True):
                if s.get(version) == "END":
                    raise RuntimeError(f"model server {address}: {model} v{version} did not load")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{model} v{version} not AVAILABLE after {_LOAD_TIMEOUT_S}s")
            time.sleep(0.5)


def _details(exc: Any) -> str:
    return f"{exc.code().name}: {exc.details()}"


def _servers(args: argparse.Namespace) -> Servers | None:
    if args.no_reload:
        return None
    return Servers(args.server or [os.environ.get("PROLIF_MODEL_SERVER") or "127.0.0.1:8500"])


def _config_path(args: argparse.Namespace) -> Path:
    if args.config is None:
        raise ValueError("no model config file: pass --config or set PROLIF_MODEL_CONFIG")
    return Path(args.config)


# -- commands
def _base_path(entry: Any, model_root: Path) -> Path:
    base = Path(entry.base_path)
    return base if base.is_absolute() else model_root / base


def _policy(entry: Any) -> str:
    policy = entry.model_version_policy
    choice = policy.WhichOneof("policy_choice") or "latest"
    if choice == "specific":
        return "specific " + ",".join(map(str, policy.specific.versions))
    if choice == "latest":
        return f"latest {policy.latest.num_versions or 1}"
    return "all"


def run_list(args: argparse.Namespace) -> int:
    from prolifscore.core.models.export import complete_versions

    path = _config_path(args)
    config = read_config(path)
    servers = _servers(args)
    rows = []
    try:
        for entry in config.model_config_list.config:
            row: dict[str, Any] = {
                "model": entry.name,
                "policy": _policy(entry),
                "on_disk": complete_versions(_base_path(entry, args.model_root)),
                "labels": dict(sorted(entry.version_labels.items())),
            }
            if servers is not None:
                try:
                    states = servers.status(entry.name)
                    row["served"] = dict(zip(servers.addresses, states, strict=True))
                except RuntimeError as exc:  # the file is still worth showing
                    print(f"warning: {exc}", file=sys.stderr)
            rows.append(row)
    finally:
        if servers is not None:
            servers.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        labels = " ".join(f"{k}={v}" for k, v in row["labels"].items()) or "-"
        print(f"{row['model']}: policy {row['policy']}; on disk {row['on_disk']}; labels {labels}")
        for address, states in row.get("served", {}).items():
            text = ", ".join(f"v{v} {s}" for v, s in sorted(states.items())) or "not served"
            print(f"  {address}: {text}")
    return 0


def _ensure_loaded(
    args: argparse.Namespace, path: Path, config: Any, entry: Any, version: int
) -> None:
    """`version` must exist and the policy must serve it; a specific-versions policy gains it
    (written, reloaded and loaded before any label points at it)."""
    from prolifscore.core.models.export import complete_versions

    on_disk = complete_versions(_base_path(entry, args.model_root))
    if version not in on_disk:
        raise ValueError(f"{entry.name} has no version {version} (on disk: {on_disk})")
    policy = entry.model_version_policy
    choice = policy.WhichOneof("policy_choice") or "latest"
    if choice == "latest" and version not in on_disk[-(policy.latest.num_versions or 1) :]:
        raise ValueError(
            f"{entry.name} v{version} is not served under its policy ({_policy(entry)}); keep "
            "more versions (latest num_versions) or list specific versions in the config"
        )
    servers = args.servers
    if choice == "specific" and version not in policy.specific.versions:
        policy.specific.versions.append(version)
        policy.specific.versions.sort()
        write_config(path, config)
        print(f"{entry.name}: version policy now {_policy(entry)}", file=sys.stderr)
        if servers is not None:
            servers.reload(config)
    if servers is not None:
        servers.wait_available(entry.name, version)


def _assign(
    args: argparse.Namespace, label: str, version: int | None, record: dict[str, Any]
) -> int:
    """Point `label` of --model at `version` (None: remove it), write, log, reload."""
    path = _config_path(args)
    config = read_config(path)
    entry = model_entry(config, args.model, path)
    previous = entry.version_labels.get(label)
    if version is not None:
        _ensure_loaded(args, path, config, entry, version)
        entry.version_labels[label] = version
    elif label in entry.version_labels:
        del entry.version_labels[label]
    write_config(path, config)
    append_history(
        path,
        {**record, "model": args.model, "label": label, "version": version, "previous": previous},
    )
    if args.servers is not None:
        args.servers.reload(config)
    before = "unset" if previous is None else f"v{previous}"
    after = "unset" if version is None else f"v{version}"
    print(f"{args.model} {label}: {before} -> {after}")
    return 0


def _with_servers(args: argparse.Namespace, work: Any) -> int:
    args.servers = _servers(args)
    try:
        if args.servers is not None:
            args.servers.status(args.model)  # unreachable: fail before touching the file
        return int(work())
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.servers is not None:
            args.servers.close()


def run_promote(args: argparse.Namespace) -> int:
    return _with_servers(args, lambda: _assign(args, args.label, args.version, {"op": "promote"}))


def run_rollback(args: argparse.Namespace) -> int:
    def work() -> int:
        stack = open_promotions(read_history(_config_path(args)), args.model)
        if args.label is not None:
            stack = [r for r in stack if r["label"] == args.label]
        if not stack:
            which = f"label {args.label} of " if args.label else ""
            raise ValueError(f"no promotion of {which}{args.model} to roll back")
        last = stack[-1]
        return _assign(
            args, last["label"], last["previous"], {"op": "rollback", "undoes": last["id"]}
        )

    return _with_servers(args, work)
