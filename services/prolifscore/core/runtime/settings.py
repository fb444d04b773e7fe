"""Settings from environment variables, one frozen dataclass per service.

Every field declares its variable, default and meaning in one place (`env(...)`), so the README's
configuration table and the Kubernetes manifests can be checked against the code.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def env(var: str, default: Any, doc: str) -> Any:
    """Declare a settings field read from environment variable `var`."""
    if isinstance(default, (list, tuple)):
        return dataclasses.field(
            default_factory=lambda: tuple(default), metadata={"env": var, "doc": doc}
        )
    return dataclasses.field(default=default, metadata={"env": var, "doc": doc})


def _parse(raw: str, kind: Any, var: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (types.UnionType, typing.Union):  # Optional[X]
        if raw.strip() == "":
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
        origin = typing.get_origin(kind)
    try:
        if kind is bool:
            if raw.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if raw.strip().lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is Path:
            return Path(raw)
        if origin is tuple:
            (item,) = {a for a in typing.get_args(kind) if a is not Ellipsis}
            return tuple(_parse(p.strip(), item, var) for p in raw.split(",") if p.strip())
        return raw
    except ValueError as exc:
        raise ValueError(f"{var}={raw!r} is not a valid {getattr(kind, '__name__', kind)}") from exc


def load(cls: type[T], environ: Mapping[str, str] | None = None, **overrides: Any) -> T:
    """Build `cls` from the environment; keyword overrides win (used by tests and the CLI)."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        var = f.metadata.get("env")
        if f.name in overrides:
            values[f.name] = overrides[f.name]
        elif dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = load(hints[f.name], environ)
        elif var and var in environ:
            values[f.name] = _parse(environ[var], hints[f.name], var)
    return cls(**values)


def nested(cls: type[T]) -> T:
    """A settings field holding another settings group (loaded from the same environment)."""
    return dataclasses.field(default_factory=cls)  # type: ignore[return-value]


def _format(value: Any) -> str:
    """A value as its variable would hold it (what `_parse` reads back)."""
    if value is None:
        return ""
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def describe(cls: type) -> list[tuple[str, str, str]]:
    """(variable, default, meaning) rows for documentation, nested groups included."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(describe(hints[f.name]))
            continue
        if "env" not in f.metadata:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((f.metadata["env"], _format(default), f.metadata["doc"]))
    return rows


def to_env(settings: Any) -> dict[str, str]:
    """The environment that `load` turns back into `settings` (nested groups included): how a
    process hands its settings to the service processes it starts."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if dataclasses.is_dataclass(value):
            out.update(to_env(value))
        elif "env" in f.metadata:
            out[f.metadata["env"]] = _format(value)
    return out


@dataclasses.dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str = env(
        "PROLIF_KAFKA_BOOTSTRAP", "127.0.0.1:9092", "Kafka bootstrap servers (host:port,...)"
    )
    client_id: str = env("PROLIF_KAFKA_CLIENT_ID", "prolifscore", "Kafka client id prefix")
    topic_ingest: str = env("PROLIF_TOPIC_INGEST", "prolif.slides.ingest", "Slide ingest topic")
    topic_tasks: str = env("PROLIF_TOPIC_TASKS", "prolif.tiles.tasks", "Tile task topic")
    topic_shards: str = env("PROLIF_TOPIC_SHARDS", "prolif.tiles.shards", "Shard index topic")
    topic_status: str = env("PROLIF_TOPIC_STATUS", "prolif.slides.status", "Slide status topic")
    topic_dlq: str = env("PROLIF_TOPIC_DLQ", "prolif.dlq", "Dead-letter topic")
    partitions: int = env("PROLIF_TOPIC_PARTITIONS", 4, "Partitions of topics the services create")
    max_poll_records: int = env(
        "PROLIF_KAFKA_MAX_POLL_RECORDS", 8, "Records a consumer takes per poll (one unit of work)"
    )
    max_poll_interval_ms: int = env(
        "PROLIF_KAFKA_MAX_POLL_INTERVAL_MS",
        300_000,
        "Longest gap between polls before the group evicts a consumer (also its rebalance timeout)",
    )
    session_timeout_ms: int = env(
        "PROLIF_KAFKA_SESSION_TIMEOUT_MS", 10_000, "Consumer group session timeout"
    )
    max_request_size: int = env(
        "PROLIF_KAFKA_MAX_REQUEST_SIZE", 8 * 1024 * 1024, "Largest message the producer sends"
    )
    delivery_timeout_ms: int = env(
        "PROLIF_KAFKA_DELIVERY_TIMEOUT_MS",
        120_000,
        "How long the producer retries a record before flush() reports it failed",
    )
    max_attempts: int = env(
        "PROLIF_MAX_ATTEMPTS",
        3,
        "Times a consumer tries a record whose handler raises before it dead-letters it (with "
        "the reason and the count) and moves on; an unreachable broker or model server is "
        "retried without limit and not counted",
    )
    test_fail_key: str = env(
        "PROLIF_TEST_FAIL_KEY",
        "",
        "Test-only fault injection: the handler raises for every record with this key (the "
        "poison-message tests use it). Leave empty",
    )
    connect_timeout_s: float = env(
        "PROLIF_KAFKA_CONNECT_TIMEOUT_S",
        120.0,
        "How long to retry (with backoff) while the broker is unreachable",
    )
    security_protocol: str = env(
        "PROLIF_KAFKA_SECURITY_PROTOCOL",
        "PLAINTEXT",
        "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL (every producer, consumer and admin client)",
    )
    ssl_ca_file: str = env(
        "PROLIF_KAFKA_SSL_CA_FILE", "", "PEM CA bundle that verifies the brokers (TLS)"
    )
    ssl_cert_file: str = env(
        "PROLIF_KAFKA_SSL_CERT_FILE", "", "PEM client certificate for brokers that require mTLS"
    )
    ssl_key_file: str = env(
        "PROLIF_KAFKA_SSL_KEY_FILE", "", "PEM private key of PROLIF_KAFKA_SSL_CERT_FILE"
    )
    sasl_mechanism: str = env(
        "PROLIF_KAFKA_SASL_MECHANISM", "", "SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"
    )
    sasl_username: str = env("PROLIF_KAFKA_SASL_USERNAME", "", "SASL user name")
    sasl_password: str = env(
        "PROLIF_KAFKA_SASL_PASSWORD", "", "SASL password (prefer PROLIF_KAFKA_SASL_PASSWORD_FILE)"
    )
    sasl_password_file: str = env(
        "PROLIF_KAFKA_SASL_PASSWORD_FILE", "", "File holding the SASL password (a mounted Secret)"
    )


@dataclasses.dataclass(frozen=True)
class PreprocessSettings:
    """Defaults of the tiling spec; an ingest message may override each per slide."""

    target_mpp: float = env("PROLIF_TARGET_MPP", 0.5, "Target microns per pixel (0.5 ~ 20x)")
    tile_size: int = env("PROLIF_TILE_SIZE", 256, "Tile side in pixels at the target resolution")
    overlap: int = env("PROLIF_TILE_OVERLAP", 0, "Pixels shared by neighbouring tiles")
    tissue_threshold: float = env(
        "PROLIF_TISSUE_THRESHOLD", 0.9, "Fraction of a tile that must be tissue to keep it"
    )
    tissue_mode: str = env("PROLIF_TISSUE_MODE", "fast", "Tissue criterion: fast or seed")
    stain_normalization: str = env(
        "PROLIF_STAIN_NORMALIZATION", "none", "Stain normalization: none, macenko or reinhard"
    )
    max_tiles: int = env("PROLIF_MAX_TILES", 0, "Per-slide cap on candidate tiles (0 = none)")
    default_mpp: float = env(
        "PROLIF_DEFAULT_MPP",
        0.25,
        "Microns per pixel assumed for slides without mpp/objective metadata (40x scanners)",
    )
    batch_size: int = env("PROLIF_BATCH_SIZE", 64, "Tiles per tile task / TFRecord shard")
    split_seed: int = env("PROLIF_SPLIT_SEED", 42, "Seed of the 80/20 slide-level split")
    validation_fraction: float = env(
        "PROLIF_VALIDATION_FRACTION", 0.2, "Share of slides in the validation split"
    )
    read_threads: int = env(
        "PROLIF_READ_THREADS",
        2,
        "Threads decoding a slide's low-resolution strips for the tissue mask at once",
    )


@dataclasses.dataclass(frozen=True)
class TracingSettings:
    """OpenTelemetry tracing (`core/runtime/tracing.py`); off unless one of these says so."""

    mode: str = env(
        "PROLIF_TRACING",
        "",
        "Tracing: otlp (spans to OTEL_EXPORTER_OTLP_ENDPOINT over OTEL_EXPORTER_OTLP_PROTOCOL "
        "grpc or http/protobuf), file (JSON lines appended to PROLIF_TRACING_FILE), off; empty "
        "= otlp when OTEL_EXPORTER_OTLP_ENDPOINT is set, else off",
    )
    file: str = env(
        "PROLIF_TRACING_FILE",
        "",
        "With PROLIF_TRACING=file: the file every process appends its spans to, one JSON "
        "object a line (tests, debugging without a collector)",
    )


@dataclasses.dataclass(frozen=True)
class RuntimeSettings:
    """What every service process needs besides Kafka."""

    slide_roots: tuple[Path, ...] = env(
        "PROLIF_SLIDE_ROOTS", ("data/slides",), "Comma-separated folders slides may be read from"
    )
    tiles_root: Path = env("PROLIF_TILES_ROOT", Path("data/tiles"), "Where TFRecord shards go")
    results_root: Path = env(
        "PROLIF_RESULTS_ROOT",
        Path("data/results"),
        "Stored results: <slide>/<request>.json + heatmap PNG (the viewer and exports read them)",
    )
    bind_host: str = env("PROLIF_BIND_HOST", "127.0.0.1", "Address gRPC and metrics bind to")
    grpc_port: int = env(
        "PROLIF_GRPC_PORT", 0, "gRPC port: health, reflection and the service's API (0 = any free)"
    )
    tls_cert_file: str = env("PROLIF_TLS_CERT_FILE", "", "PEM certificate: serve gRPC over TLS")
    tls_key_file: str = env("PROLIF_TLS_KEY_FILE", "", "PEM private key for PROLIF_TLS_CERT_FILE")
    tls_ca_file: str = env(
        "PROLIF_TLS_CA_FILE",
        "",
        "PEM CA for mutual TLS: the gRPC server then requires client certificates it signed, "
        "and outgoing gRPC channels verify servers with it and present PROLIF_TLS_CERT_FILE",
    )
    metrics_port: int = env("PROLIF_METRICS_PORT", 0, "Prometheus metrics port (0 = any free)")
    ray_address: str = env(
        "PROLIF_RAY_ADDRESS", "", "Ray cluster to join (empty = start a local one on 127.0.0.1)"
    )
    ray_num_cpus: int = env("PROLIF_RAY_NUM_CPUS", 0, "CPUs for a local Ray (0 = all)")
    log_level: str = env("PROLIF_LOG_LEVEL", "INFO", "Log level (JSON lines on stderr)")
    shutdown_grace_s: float = env(
        "PROLIF_SHUTDOWN_GRACE_S", 20.0, "On SIGTERM, how long in-flight work may finish"
    )
    tracing: TracingSettings = nested(TracingSettings)
