"""Local model server: TensorFlow Serving's gRPC API over a TF Serving model root.

The embedded default stands in for the `tensorflow/serving` container, which cannot be
installed here. Clients use the standard `tensorflow_serving.apis` stubs and must not be able to
tell the two apart, so requests are validated in TF Serving's order and rejected with its
status codes and messages (sources: tensorflow/serving `predict_util.cc`,
`get_model_metadata_impl.cc`, `get_model_status_impl.cc`, `server_core.cc`, `core/manager.h`).

Versions are found like TF Serving's file-system source: integer folders under each model's
base path, re-scanned every `poll_s`; the version policy (latest N / all / specific) picks the
aspired ones. Loading runs on the poll thread, never on a request; a new version is published
only once loaded (and warmed up), and requests already running keep the version they resolved.
Entry point: `prolifscore-modelserver`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2,
    prediction_service_pb2_grpc,
    status_pb2,
)
from tensorflow_serving.config import model_server_config_pb2

from prolifscore.core.models.export import read_metadata
from prolifscore.core.runtime import metrics
from prolifscore.core.runtime.logs import setup_logging
from prolifscore.core.runtime.service import ServiceRuntime
from prolifscore.core.runtime.settings import load
from prolifscore.modelserver.config import ModelServerSettings

log = logging.getLogger(__name__)
NAME = "modelserver"
DEFAULT_SIGNATURE = "serving_default"
PREDICTION_SERVICE = prediction_service_pb2.DESCRIPTOR.services_by_name["PredictionService"]
MODEL_SERVICE = model_service_pb2.DESCRIPTOR.services_by_name["ModelService"]
_STATE = get_model_status_pb2.ModelVersionStatus
_CODES = {c.value[0]: c for c in grpc.StatusCode}


def grpc_options(max_message_mb: int) -> list[tuple[str, int]]:
    """Channel/server options for tile batches (32 float32 224 px tiles are 19 MB; gRPC's
    default limit is 4 MB). Clients need the same options on their channel."""
    limit = max_message_mb * 1024 * 1024
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]


class ServingError(Exception):
    """A request failure with the gRPC status code TF Serving would answer."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# --------------------------------------------------------------------------------------------
# Configuration: which models, where, which versions.


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


def complete_versions(base_path: Path) -> list[int]:
    """Integer folders holding saved_model.pb; exports in progress (hidden temporary names,
    or a folder whose saved_model.pb is not written yet) are not versions yet."""
    if not base_path.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in base_path.iterdir()
        if p.name.isdigit() and (p / "saved_model.pb").is_file()
    )


def _fingerprint(path: Path) -> tuple[tuple[str, int, int], ...]:
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


# --------------------------------------------------------------------------------------------
# One loaded version.


class Servable:
    """A loaded SavedModel version: its signatures and their SignatureDefs."""

    def __init__(self, name: str, version: int, path: Path) -> None:
        self.name = name
        self.version = version
        self.path = path
        proto = saved_model_pb2.SavedModel()
        proto.ParseFromString((path / "saved_model.pb").read_bytes())
        graphs = [g for g in proto.meta_graphs if "serve" in g.meta_info_def.tags]
        if not graphs:
            raise ValueError(f"{path}: no meta graph tagged 'serve'")
        self.signature_defs: dict[str, meta_graph_pb2.SignatureDef] = dict(graphs[0].signature_def)
        self._loaded = tf.saved_model.load(str(path), tags=["serve"])
        self.functions = dict(self._loaded.signatures.items())
        self.metadata = read_metadata(path)

    def warmup(self) -> None:
        """One tiny request per signature, so the first client does not pay graph setup."""
        size = int(self.metadata.get("input_size", 64))
        for key, fn in self.functions.items():
            sig = self.signature_defs.get(key)
            if sig is None:
                continue
            inputs = {}
            for alias, info in sig.inputs.items():
                dims = [d.size for d in info.tensor_shape.dim]
                shape = [(1 if i == 0 else size) if d < 0 else d for i, d in enumerate(dims)]
                dtype = tf.dtypes.as_dtype(info.dtype)
                inputs[alias] = tf.zeros(shape, dtype)
            try:
                fn(**inputs)
            except Exception as exc:  # warm-up is best effort; real requests report errors
                log.info(
                    "warm-up skipped",
                    extra={"model": self.name, "signature": key, "error": str(exc)[:200]},
                )

    def predict(self, request: predict_pb2.PredictRequest, signature_name: str) -> dict[str, Any]:
        """Validate like TF Serving's PreProcessPrediction, run, return the filtered outputs."""
        sig = self.signature_defs.get(signature_name)
        fn = self.functions.get(signature_name)
        if sig is None or fn is None:
            raise ServingError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f'Serving signature key "{signature_name}" not found.',
            )
        sent, wanted = set(request.inputs), set(sig.inputs)
        if len(sent) != len(wanted) and not (len(sent) < len(wanted) and sig.defaults):
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input size does not match signature: {len(sent)}!={len(wanted)} "
                f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(wanted))}}}). "
                f"Sent extra: {{{','.join(sorted(sent - wanted))}}}. "
                f"Missing but required: {{{','.join(sorted(wanted - sent))}}}.",
            )
        feeds: dict[str, tf.Tensor] = {}
        for index, (alias, info) in enumerate(sorted(sig.inputs.items())):
            if alias not in request.inputs and alias in sig.defaults:
                feeds[alias] = tf.constant(tf.make_ndarray(sig.defaults[alias]))
                continue
            if alias not in request.inputs:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Signature input alias: {alias}(feed name: {info.name}) not found in "
                    f"request and no default value provided. Inputs expected to be in the "
                    f"request {{{','.join(sorted(sent))}}}, or default input alias set: {{}}",
                )
            feeds[alias] = _to_tensor(alias, index, request.inputs[alias], info)
        aliases = list(request.output_filter)
        for alias in aliases:
            if alias not in sig.outputs:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"output tensor alias not found in signature: {alias} Outputs expected "
                    f"to be in the set {{{','.join(sorted(sig.outputs))}}}.",
                )
        if len(set(aliases)) != len(aliases):
            dup = next(a for a in aliases if aliases.count(a) > 1)
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT, f"duplicate output tensor alias: {dup}"
            )
        try:
            outputs = fn(**feeds)
        except tf.errors.OpError as exc:
            code = _CODES.get(exc.error_code, grpc.StatusCode.INTERNAL)
            raise ServingError(code, exc.message) from exc
        except (TypeError, ValueError) as exc:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        return {a: outputs[a] for a in (aliases or sorted(sig.outputs))}


def _dtype_name(dtype: int) -> str:
    """TF's C++ DataTypeString spelling ("float", not Python's "float32") for TF's messages."""
    if not dtype:
        return "invalid"
    name = tf.dtypes.as_dtype(dtype).name
    return {"float32": "float", "float64": "double", "float16": "half"}.get(name, name)


def _to_tensor(alias: str, index: int, proto: Any, info: meta_graph_pb2.TensorInfo) -> tf.Tensor:
    """TensorProto -> tensor, checked against the signature's dtype and shape."""
    if proto.dtype != info.dtype:
        got = _dtype_name(proto.dtype)
        want = _dtype_name(info.dtype)
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Expects arg[{index}] to be {want} but {got} is provided",
        )
    try:
        array = tf.make_ndarray(proto)
    except Exception as exc:
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT, f"tensor parsing error: {alias}: {exc}"
        ) from exc
    if not info.tensor_shape.unknown_rank:
        want = [d.size for d in info.tensor_shape.dim]
        if len(want) != array.ndim or any(
            w >= 0 and w != g for w, g in zip(want, array.shape, strict=True)
        ):
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input {alias} has shape {list(array.shape)}, the signature expects "
                f"{want} (-1 = any)",
            )
    return tf.convert_to_tensor(array)


# --------------------------------------------------------------------------------------------
# Versions on disk -> loaded servables.


@dataclass
class _VersionState:
    state: int
    error: str = ""
    code: int = 0


class ModelManager:
    """Keeps the aspired versions of every configured model loaded.

    `served` is an immutable snapshot replaced as a whole after each change, so a request reads
    it without locking and keeps its Servable even if the next poll unloads that version.
    A version that fails to load is retried when its files change; meanwhile the previous
    versions stay served (the failed one does not count as available for the policy).
    """

    def __init__(self, model_root: Path, config_path: Path | None, *, warmup: bool = True) -> None:
        self.model_root = Path(model_root)
        self.config_path = config_path
        self.warmup = warmup
        self.served: dict[str, dict[int, Servable]] = {}
        self.entries: dict[str, ModelEntry] = {}
        self._states: dict[str, dict[int, _VersionState]] = {}
        self._failed: dict[tuple[str, int], Any] = {}
        self._config_mtime: int | None = None
        self._override: dict[str, ModelEntry] | None = None
        self._poll_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- configuration
    def _current_entries(self) -> dict[str, ModelEntry]:
        if self.config_path is None:
            return self._override if self._override is not None else scan_root(self.model_root)
        try:
            mtime = self.config_path.stat().st_mtime_ns
        except FileNotFoundError:
            if self._config_mtime is None:
                raise  # no config at startup is fatal, as in TF Serving
            log.error(
                "model config file missing; keeping the last one",
                extra={"path": str(self.config_path)},
            )
            return self.entries
        if mtime != self._config_mtime:
            try:
                entries = read_model_config(self.config_path, self.model_root)
            except Exception as exc:
                if self._config_mtime is None:
                    raise  # a broken config at startup is fatal, as in TF Serving
                log.error("model config not reloaded", extra={"error": str(exc)})
                self._config_mtime = mtime
                return self.entries
            self._config_mtime = mtime
            self._override = None
            log.info(
                "model config loaded",
                extra={"path": str(self.config_path), "models": sorted(entries)},
            )
            return entries
        return self._override if self._override is not None else self.entries

    def reload_config(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        """ModelService.HandleReloadConfigRequest: replace the config in memory and apply it."""
        entries = parse_model_config(config, self.model_root)
        with self._poll_lock:
            self._override = entries
        self.poll()

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
                aspired = entry.aspired(v for v in on_disk if not self._still_failed(entry, v))
                for version in sorted(aspired - set(current)):
                    if self._stop.is_set():
                        return
                    servable = self._load(entry, version)
                    if servable is not None:
                        current[version] = servable
                        self._publish(served)
                # A version that failed just now leaves the policy's choice, so the previous
                # version keeps serving rather than being dropped for a broken one.
                aspired = entry.aspired(v for v in on_disk if not self._still_failed(entry, v))
                ready = aspired <= set(current)
                for version in sorted(set(current) - aspired):
                    if ready or version not in on_disk:
                        self._unload(served, name, version)
                if not current:
                    served.pop(name)
            self._publish(served)

    def _publish(self, served: dict[str, dict[int, Servable]]) -> None:
        """Swap in a fresh snapshot: requests never see a dict that is being changed."""
        self.served = {name: dict(versions) for name, versions in served.items()}

    def _still_failed(self, entry: ModelEntry, version: int) -> bool:
        key = (entry.name, version)
        if key not in self._failed:
            return False
        if self._failed[key] == _fingerprint(entry.base_path / str(version)):
            return True
        del self._failed[key]  # files changed: try again
        return False

    def _set_state(self, name: str, version: int, state: _VersionState) -> None:
        with self._state_lock:
            self._states.setdefault(name, {})[version] = state

    def _load(self, entry: ModelEntry, version: int) -> Servable | None:
        path = entry.base_path / str(version)
        self._set_state(entry.name, version, _VersionState(_STATE.LOADING))
        started = time.perf_counter()
        try:
            servable = Servable(entry.name, version, path)
            if self.warmup:
                servable.warmup()
        except Exception as exc:
            self._failed[(entry.name, version)] = _fingerprint(path)
            message = f"Loading servable: {{name: {entry.name} version: {version}}} failed: {exc}"
            self._set_state(
                entry.name,
                version,
                _VersionState(_STATE.END, message[:2000], grpc.StatusCode.UNKNOWN.value[0]),
            )
            log.error(
                "model load failed",
                extra={"model": entry.name, "version": version, "error": str(exc)[:500]},
            )
            return None
        self._set_state(entry.name, version, _VersionState(_STATE.AVAILABLE))
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
        served[name].pop(version, None)
        self._set_state(name, version, _VersionState(_STATE.END))
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

    def status(self, name: str, version: int | None) -> list[tuple[int, _VersionState]]:
        with self._state_lock:
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


# --------------------------------------------------------------------------------------------
# gRPC services.


def _abort(context: grpc.ServicerContext, exc: ServingError) -> None:
    metrics.FAILURES.labels(NAME, exc.code.name.lower()).inc()
    context.abort(exc.code, exc.message)


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict and GetModelMetadata; Classify / Regress / MultiInference stay UNIMPLEMENTED
    (our signatures are predict signatures)."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    def Predict(
        self, request: predict_pb2.PredictRequest, context: grpc.ServicerContext
    ) -> predict_pb2.PredictResponse:
        try:
            with metrics.DURATION.labels(NAME, "predict").time():
                if not request.HasField("model_spec"):
                    raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
                servable = self.manager.resolve(request.model_spec)
                signature = request.model_spec.signature_name or DEFAULT_SIGNATURE
                outputs = servable.predict(request, signature)
                response = predict_pb2.PredictResponse()
                response.model_spec.name = servable.name
                response.model_spec.version.value = servable.version
                response.model_spec.signature_name = signature
                for alias, tensor in outputs.items():
                    response.outputs[alias].CopyFrom(tf.make_tensor_proto(tensor.numpy()))
                return response
        except ServingError as exc:
            _abort(context, exc)
            raise  # unreachable: abort raises

    def GetModelMetadata(
        self,
        request: get_model_metadata_pb2.GetModelMetadataRequest,
        context: grpc.ServicerContext,
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        try:
            if not request.HasField("model_spec"):
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
            if not request.metadata_field:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "GetModelMetadataRequest must specify at least one metadata_field",
                )
            for name in request.metadata_field:
                if name != "signature_def":
                    raise ServingError(
                        grpc.StatusCode.INVALID_ARGUMENT, f"Metadata field {name} is not supported"
                    )
            servable = self.manager.resolve(request.model_spec)
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = servable.name
            response.model_spec.version.value = servable.version
            sig_map = get_model_metadata_pb2.SignatureDefMap()
            for key, sig in servable.signature_defs.items():
                sig_map.signature_def[key].CopyFrom(sig)
            response.metadata["signature_def"].Pack(sig_map)
            return response
        except ServingError as exc:
            _abort(context, exc)
            raise


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    """GetModelStatus (per-version state) and HandleReloadConfigRequest."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    def GetModelStatus(
        self, request: get_model_status_pb2.GetModelStatusRequest, context: grpc.ServicerContext
    ) -> get_model_status_pb2.GetModelStatusResponse:
        try:
            if not request.HasField("model_spec"):
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
            spec = request.model_spec
            version = spec.version.value if spec.HasField("version") else None
            response = get_model_status_pb2.GetModelStatusResponse()
            for number, state in self.manager.status(spec.name, version):
                response.model_version_status.add(
                    version=number,
                    state=state.state,
                    status=status_pb2.StatusProto(error_code=state.code, error_message=state.error),
                )
            return response
        except ServingError as exc:
            _abort(context, exc)
            raise

    def HandleReloadConfigRequest(
        self, request: model_management_pb2.ReloadConfigRequest, context: grpc.ServicerContext
    ) -> model_management_pb2.ReloadConfigResponse:
        try:
            self.manager.reload_config(request.config)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return model_management_pb2.ReloadConfigResponse(status=status_pb2.StatusProto())


# --------------------------------------------------------------------------------------------
# Process.


class ModelServer:
    """The running server: gRPC runtime (one port) + model manager with its poll thread."""

    def __init__(self, settings: ModelServerSettings) -> None:
        self.settings = settings
        self.manager = ModelManager(
            settings.model_root, settings.model_config, warmup=settings.warmup
        )
        runtime_settings = dataclasses.replace(settings.runtime, grpc_port=settings.port)
        self.runtime = ServiceRuntime(
            NAME,
            runtime_settings,
            grpc_options=grpc_options(settings.max_message_mb),
            max_workers=settings.workers,
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionService(self.manager), self.runtime.server
        )
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(
            ModelService(self.manager), self.runtime.server
        )
        self.runtime.add_service(PREDICTION_SERVICE.full_name)
        self.runtime.add_service(MODEL_SERVICE.full_name)
        self.port = 0

    def start(self) -> ModelServer:
        self.manager.start(self.settings.poll_s)
        self.runtime.start()
        self.port = self.runtime.port
        self.runtime.set_serving(True)
        log.info(
            "model server ready",
            extra={
                "address": f"{self.settings.runtime.bind_host}:{self.port}",
                "model_root": str(self.settings.model_root),
                "models": {n: sorted(v) for n, v in self.manager.served.items()},
            },
        )
        return self

    def stop(self) -> None:
        self.runtime.set_serving(False)
        self.manager.stop()
        self.runtime.stop()


def serve(settings: ModelServerSettings) -> tuple[ModelServer, int]:
    """Load the initial versions, then serve; returns the server and its bound port."""
    server = ModelServer(settings).start()
    return server, server.port


def main() -> None:
    settings = load(ModelServerSettings)
    setup_logging(NAME, settings.runtime.log_level)
    server, _ = serve(settings)
    server.runtime.serve_until_stopped()
    server.stop()


if __name__ == "__main__":
    main()
