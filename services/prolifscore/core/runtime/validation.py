"""What the services accept from outside, checked where a message enters (Kafka consumer, gRPC
method, CLI) before any of it is used, copied into events or turned into a file name.

- **Identifiers** that become file or folder names, Kafka keys or consumer groups (request, run,
  slide and model names) must match one pattern, `ID_PATTERN`: 1-128 ASCII letters, digits,
  `.`, `_`, `-`, starting with a letter or digit. So no `/`, no `..`, no hidden names, nothing
  that reads as an option, no percent-encoding and no look-alike Unicode letters. TUPAC16 and
  TCGA names (`TUPAC-TR-001`, `TCGA-A2-A0CM-01Z-00-DX1.AC4901DE-...`) fit as they are; file
  names that do not become ids through `id_from_name`.
- **Paths** are at most `MAX_PATH_BYTES` of UTF-8 without control or invisible format characters
  (NUL, newlines, bidi overrides, zero-width characters, lone surrogates); where they may point is
  decided by `confine` (or the slide reader's own confinement) against configured roots.
- **Numbers** have ranges (`SPEC_RANGES`, `TRAIN_RANGES`), enums must be known values, doubles
  finite; regions of interest stay within `core/wsi/roi.py`'s limits.

A rejected value is never echoed whole: messages name the field, the rule and at most a short,
escaped prefix of what was sent (`InvalidInput`), so that neither a 5 MB id nor a 100 KB path can
travel into status events, manifests, logs or gRPC trailers.
"""

from __future__ import annotations

import math
import os
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from prolifscore.core.wsi import roi
from prolifscore.v1 import pipeline_pb2 as pb
from prolifscore.v1 import scoring_pb2 as spb
from prolifscore.v1 import training_pb2 as tpb

ID_PATTERN = "[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
MAX_ID = 128
MAX_PATH_BYTES = 4096  # Linux PATH_MAX
MAX_MESSAGE_BYTES = 1024  # an error message (gRPC details, status reason) at most
SHOWN = 40  # characters of a rejected value quoted in the error
_ID = re.compile(ID_PATTERN)
_NOT_ID_CHAR = re.compile(r"[^A-Za-z0-9._-]+")
_SPEC_HASH = re.compile("[0-9a-f]{1,64}")
# Unicode categories refused in any text: controls (NUL, ESC, newlines), invisible format
# characters (bidi overrides, zero-width joiners, BOM), surrogates, line/paragraph separators.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})

# (low, high) inclusive, per field of a TilingSpec override.
SPEC_RANGES: dict[str, tuple[float, float]] = {
    "target_magnification": (0.1, 400.0),
    "target_mpp": (0.025, 100.0),
    "tile_size": (16, 4096),
    "overlap": (0, 4095),
    "tissue_threshold": (0.0, 1.0),
    "max_tiles": (0, 10_000_000),
}
MOLECULAR_SCORE_RANGE = (-10.0, 10.0)
TRAIN_RANGES: dict[str, tuple[int, int]] = {
    "workers": (0, 256),
    "epochs": (0, 10_000),
    "input_size": (0, 1024),
}
MIN_INPUT_SIZE = 32  # ResNet50's smallest input
WEIGHTS_KEYWORDS = ("", "none", "random", "imagenet")
PROFILES = ("", "quick")
MAX_TILES_PER_TASK = 65_536
MAX_BATCHES = 1_000_000


class InvalidInput(ValueError):
    """A field of a request or message breaks a rule; the message is short and safe to show."""

    def __init__(self, field: str, problem: str, *, text: str = "") -> None:
        super().__init__(text or f"{field} {problem}")
        self.field = field


class OutsideRoots(InvalidInput):
    """A path resolves outside every configured root."""


def shown(value: str) -> str:
    """A short, escaped quotation of a rejected value (never the whole of it)."""
    head = value[:SHOWN]
    return ascii(head) + ("..." if len(value) > SHOWN else "")


def clip(text: str, max_bytes: int = MAX_MESSAGE_BYTES) -> str:
    """`text` in at most `max_bytes` of UTF-8: its start and its end (where messages that quote
    an input say what is wrong with it), the middle cut and counted."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= max_bytes:
        return text
    tail = max_bytes // 4
    head = max_bytes - tail - 32
    cut = len(raw) - head - tail
    start = raw[:head].decode("utf-8", "ignore")
    end = raw[-tail:].decode("utf-8", "ignore")
    return f"{start} [... {cut} bytes cut ...] {end}"


def check_text(field: str, value: str, max_bytes: int, *, required: bool = False) -> str:
    """Size in UTF-8 bytes first (so a huge value costs nothing more), then refused characters."""
    if not value:
        if required:
            raise InvalidInput(field, "is required")
        return value
    size = len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise InvalidInput(field, f"is longer than {max_bytes} bytes ({size})")
    if not value.isprintable():  # every refused category is unprintable: scan only then
        for offset, char in enumerate(value):
            if unicodedata.category(char) in _REFUSED_CATEGORIES:
                raise InvalidInput(
                    field,
                    f"contains the control or invisible character U+{ord(char):04X} "
                    f"at offset {offset}",
                )
    return value


def check_id(field: str, value: str, *, required: bool = False) -> str:
    """`value` must match `ID_PATTERN` (empty is allowed unless `required`)."""
    if not value:
        if required:
            raise InvalidInput(field, "is required")
        return value
    if len(value) > MAX_ID:
        raise InvalidInput(field, f"is longer than {MAX_ID} characters ({len(value)})")
    if not _ID.fullmatch(value):
        raise InvalidInput(field, f"must match {ID_PATTERN}, got {shown(value)}")
    return value


def check_path(field: str, value: str, *, required: bool = True) -> str:
    return check_text(field, value, MAX_PATH_BYTES, required=required)


def check_range(field: str, value: float, low: float, high: float) -> float:
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidInput(field, f"must be a finite number, got {value}")
    if not low <= value <= high:
        raise InvalidInput(field, f"must be within [{low:g}, {high:g}], got {value:g}")
    return value


def check_enum(field: str, value: int, enum: EnumTypeWrapper) -> int:
    if value not in enum.values():
        raise InvalidInput(field, f"{value} is not one of {sorted(enum.values())}")
    return value


def id_from_name(name: str) -> str:
    """A slide id from a file name (without extension): the name itself when it is a valid id,
    else without accents and with its runs of other characters replaced by `_` (`Färbung 1
    (HE)` -> `Farbung_1_HE_`), cut to `MAX_ID`. Different names can meet in one id: callers
    that send many check for that."""
    if _ID.fullmatch(name):
        return name
    plain = "".join(c for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c))
    cleaned = _NOT_ID_CHAR.sub("_", plain).lstrip("._-")
    return (cleaned or "slide")[:MAX_ID]


def passes(check: object, *args: object) -> bool:
    """Whether `check(*args)` accepts: for echoing only values that passed into events."""
    try:
        check(*args)  # type: ignore[operator]
    except InvalidInput:
        return False
    return True


def carried_id(value: str) -> str:
    """`value` if it is a valid id, else "": what a failure event may repeat of a rejected id."""
    return value if passes(check_id, "id", value) else ""


def carried_path(value: str) -> str:
    return value if passes(check_path, "path", value) else ""


def confine(
    field: str, value: str | os.PathLike[str], roots: Sequence[str | os.PathLike[str]], what: str
) -> Path:
    """Resolve `value` (symlinks included; relative = under the first root) and require it to
    lie under one of `roots`; whether it exists is left to the reader. `what` names the
    setting that lists the roots, for the error."""
    check_path(field, str(value))
    real_roots = [Path(r).resolve() for r in roots]
    if not real_roots:
        raise OutsideRoots(field, f"cannot be read: no roots are configured ({what})")
    raw = Path(value)
    candidate = (raw if raw.is_absolute() else real_roots[0] / raw).resolve()
    if not any(candidate.is_relative_to(r) for r in real_roots):
        raise OutsideRoots(field, f"{shown(str(value))} is outside the configured roots ({what})")
    return candidate


# -- messages ---------------------------------------------------------------------------------


def validate_spec(spec: pb.TilingSpec, prefix: str = "spec.") -> None:
    for name, (low, high) in SPEC_RANGES.items():
        if spec.HasField(name):
            check_range(prefix + name, getattr(spec, name), low, high)
    if spec.HasField("tile_size") and spec.HasField("overlap") and spec.overlap >= spec.tile_size:
        raise InvalidInput(prefix + "overlap", f"must be below tile_size ({spec.tile_size})")
    check_enum(prefix + "stain_normalization", spec.stain_normalization, pb.StainNormalization)
    check_enum(prefix + "tissue_mode", spec.tissue_mode, pb.TissueMode)


def check_rois(field: str, rois: Sequence[pb.Polygon]) -> None:
    """Regions of interest within `core/wsi/roi.py`'s limits (regions, rings, vertices, finite
    coordinates): checked on entry, before a slide is opened for them."""
    try:
        roi.validate(rois)
    except roi.RoiError as exc:
        reason = clip(str(exc), 200)
        raise InvalidInput(field, reason, text=f"regions of interest: {reason}") from exc


def validate_labels(labels: pb.Labels, prefix: str = "labels.") -> None:
    if labels.HasField("tumor_score") and labels.tumor_score not in (1, 2, 3):
        raise InvalidInput(prefix + "tumor_score", f"must be 1, 2 or 3, got {labels.tumor_score}")
    if labels.HasField("molecular_score"):
        check_range(prefix + "molecular_score", labels.molecular_score, *MOLECULAR_SCORE_RANGE)


def validate_ingest(msg: pb.SlideIngest) -> None:
    """A SlideIngest as the tiling service accepts it (where the path points is checked when
    the slide is opened: `confine_path` against the slide roots)."""
    check_id("slide_id", msg.slide_id, required=True)
    check_path("path", msg.path)
    check_id("run_id", msg.run_id)
    validate_labels(msg.labels)
    check_enum("split", msg.split, pb.Split)
    validate_spec(msg.spec)
    check_rois("rois", msg.rois)


def validate_tile_task(task: pb.TileTask) -> None:
    """A TileTask as the filtering service accepts it: its slide id and spec hash name shard
    files, its sizes bound the memory a batch takes."""
    check_id("slide_id", task.slide_id, required=True)
    check_path("path", task.path)
    check_id("run_id", task.run_id)
    if not _SPEC_HASH.fullmatch(task.spec.spec_hash):
        raise InvalidInput(
            "spec.spec_hash", f"must be 1-64 hex digits, got {shown(task.spec.spec_hash)}"
        )
    check_range("batch_count", task.batch_count, 1, MAX_BATCHES)
    check_range("batch_index", task.batch_index, 0, task.batch_count - 1)
    check_range("tiles", len(task.tiles), 0, MAX_TILES_PER_TASK)
    check_range("spec.tile_size", task.spec.tile_size, *SPEC_RANGES["tile_size"])
    check_range("spec.read_size", task.spec.read_size, 1, 1 << 16)
    validate_labels(task.labels)
    check_enum("split", task.split, pb.Split)


def validate_score_request(request: spb.ScoreRequest) -> None:
    """A ScoreRequest as scoring accepts it over gRPC and Kafka (where its path points is checked
    when the slide is opened)."""
    check_id("request_id", request.request_id)
    check_id("slide_id", request.slide_id)
    check_path("path", request.path)
    validate_spec(request.spec)
    check_enum("aggregation", request.aggregation, spb.Aggregation)
    check_enum("score_rule", request.score_rule, spb.ScoreRule)
    check_rois("rois", request.rois)


def validate_train_request(request: tpb.TrainRequest, models: Sequence[str]) -> None:
    """A TrainRequest's fields (where its dataset and weights point: `confine`)."""
    check_id("request_id", request.request_id)
    check_id("model", request.model, required=True)
    if request.model not in models:
        names = " or ".join(repr(m) for m in models)
        raise InvalidInput("model", f"must be {names}, got {request.model!r}")
    check_path("dataset", request.dataset)
    for name, (low, high) in TRAIN_RANGES.items():
        check_range(name, getattr(request, name), low, high)
    if 0 < request.input_size < MIN_INPUT_SIZE:
        raise InvalidInput("input_size", f"must be 0 (default) or at least {MIN_INPUT_SIZE}")
    check_path("weights", request.weights, required=False)
    if request.profile not in PROFILES:
        raise InvalidInput("profile", f"must be empty or 'quick', got {shown(request.profile)}")
