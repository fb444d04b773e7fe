"""`prolifscore score`: score one slide over gRPC (with a live progress bar), or in-process."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from google.protobuf import json_format

from prolifscore.core.grading.evaluation import SCORE_RULES
from prolifscore.core.runtime.settings import RuntimeSettings, load
from prolifscore.core.runtime.tls import (
    TLSConfigError,
    TLSFiles,
    channel_credentials,
    open_channel,
)
from prolifscore.core.runtime.validation import InvalidInput, id_from_name, validate_score_request
from prolifscore.v1 import scoring_pb2 as spb

_AGG = {
    "mean": spb.AGGREGATION_MEAN_PROBABILITY,
    "rounded_mean": spb.AGGREGATION_ROUNDED_MEAN_CLASS,
}


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("score", help="score a slide (gRPC client, or --local in-process)")
    p.add_argument("slide", help="slide path (as the server sees it, or a local file)")
    p.add_argument("--server", default=os.environ.get("PROLIF_SCORING_ADDRESS", "127.0.0.1:50051"))
    p.add_argument("--heatmap", type=Path, help="write the heatmap PNG here")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--tiles", action="store_true", help="include per-tile predictions")
    p.add_argument("--aggregation", choices=sorted(_AGG))
    p.add_argument(
        "--rule",
        choices=list(SCORE_RULES),
        help="how the slide's class is chosen (default: the service's, normally the model's own)",
    )
    p.add_argument(
        "--roi",
        type=Path,
        help="score only tiles centred in these regions: GeoJSON or TUPAC16 x,y,w,h CSV file",
    )
    p.add_argument(
        "--model-label", default="", help="version label of the tumor model (e.g. stable, canary)"
    )
    p.add_argument("--timeout", type=float, default=600.0, help="deadline in seconds")
    p.add_argument("--token", default=os.environ.get("PROLIF_AUTH_TOKEN", ""), help="bearer token")
    p.add_argument(
        "--tls-ca",
        default=os.environ.get("PROLIF_TLS_CA_FILE", ""),
        help="CA certificate: connect with TLS and verify the server (default PROLIF_TLS_CA_FILE)",
    )
    p.add_argument(
        "--tls-cert",
        default=os.environ.get("PROLIF_TLS_CERT_FILE", ""),
        help="client certificate for mutual TLS (default PROLIF_TLS_CERT_FILE; needs --tls-ca)",
    )
    p.add_argument(
        "--tls-key",
        default=os.environ.get("PROLIF_TLS_KEY_FILE", ""),
        help="private key of --tls-cert (default PROLIF_TLS_KEY_FILE)",
    )
    p.add_argument("--local", action="store_true", help="score in-process, no services")
    p.add_argument(
        "--model-root",
        type=Path,
        default=Path(os.environ.get("PROLIF_MODEL_ROOT", "data/models")),
        help="with --local: the TF Serving model root",
    )
    p.set_defaults(func=run)


def build_request(
    slide: str,
    *,
    heatmap: bool = False,
    tiles: bool = False,
    aggregation: str | None = None,
    roi_file: Path | None = None,
    rule: str | None = None,
    model_label: str = "",
) -> spb.ScoreRequest:
    """`slide` is a path as the server sees it; a local file is sent as its absolute path. The
    slide id is the file name without extension (made a valid id if it is not one). Raises
    RoiError for an unusable `roi_file`."""
    from prolifscore.core.wsi import roi

    path = Path(slide)
    return spb.ScoreRequest(
        slide_id=id_from_name(path.stem),
        path=str(path.resolve()) if path.exists() else slide,
        include_heatmap=heatmap,
        include_tiles=tiles,
        aggregation=_AGG.get(aggregation or "", 0),
        score_rule=SCORE_RULES.get(rule or "", 0),
        rois=roi.read_file(roi_file) if roi_file else [],
        model_label=model_label,
    )


def score_remote(
    server: str,
    request: spb.ScoreRequest,
    *,
    timeout: float,
    token: str = "",
    tls: TLSFiles | None = None,
) -> spb.SlideScore:
    """Score over gRPC, streaming progress to a progress bar on stderr; `tls` as the services'
    PROLIF_TLS_* settings (TLS when it names a CA, mutual with a certificate)."""
    from tqdm import tqdm

    from prolifscore.v1 import scoring_pb2_grpc

    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    channel = open_channel(server, tls, options)
    metadata = [("authorization", f"Bearer {token}")] if token else []
    with (
        channel,
        tqdm(total=0, unit="tile", desc="scoring", file=sys.stderr, dynamic_ncols=True) as bar,
    ):
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        for event in stub.StreamScoreSlide(request, timeout=timeout, metadata=metadata):
            if event.HasField("result"):
                return event.result
            p = event.progress
            bar.total = max(bar.total or 0, p.tiles_found)
            bar.set_postfix(kept=p.tiles_kept, scored=p.tiles_scored)
            bar.update(p.tiles_read - bar.n)
    raise RuntimeError("the server closed the stream without a result")


def score_local(model_root: Path, request: spb.ScoreRequest) -> spb.SlideScore:
    """Score in this process with the models of `model_root` (TF Serving layout)."""
    from prolifscore.core.runtime.settings import PreprocessSettings
    from prolifscore.scoring.model_client import InProcessModels
    from prolifscore.scoring.scorer import ScoringOptions, score_slide

    models = InProcessModels(model_root)
    try:
        # The model root is at hand: the detector's exported threshold applies, and untrained
        # models are flagged in the result's warnings.
        options = ScoringOptions(preprocess=load(PreprocessSettings), metadata_root=str(model_root))
        return score_slide(
            request,
            slide_roots=(str(Path(request.path).resolve().parent),),
            options=options,
            models=models,
        )
    finally:
        models.close()


def summary(result: spb.SlideScore) -> dict[str, object]:
    rule = next((n for n, v in SCORE_RULES.items() if v == result.score_rule), "")
    return {
        "slide_id": result.slide_id,
        "tumor_score": result.tumor_score,
        "score_rule": rule,
        "proliferation_index": round(result.proliferation_index, 4),
        "probabilities": [round(p, 4) for p in result.probabilities],
        "molecular_score": (
            round(result.molecular_score, 4) if result.HasField("molecular_score") else None
        ),
        "mitotic_score": result.mitotic_score,
        "mitoses_per_10hpf": result.mitoses_per_10hpf,
        "fused_score": result.fused_score,
        "tiles_scored": result.tiles_scored,
        "models": {m.name: m.version for m in result.models},
    }


def describe_error(exc: BaseException) -> str:
    import grpc

    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
    return f"{type(exc).__name__}: {exc}"


def tls_files(args: argparse.Namespace) -> RuntimeSettings:
    """The TLS flags as the settings the channel helper reads, their files checked."""
    if (args.tls_cert or args.tls_key) and not args.tls_ca:
        raise TLSConfigError("--tls-cert and --tls-key need --tls-ca (it verifies the server)")
    files = load(
        RuntimeSettings,
        tls_ca_file=args.tls_ca,
        tls_cert_file=args.tls_cert,
        tls_key_file=args.tls_key,
    )
    channel_credentials(files)  # unreadable or half-set files fail here, before any call
    return files


def run(args: argparse.Namespace) -> int:
    try:
        request = build_request(
            args.slide,
            heatmap=args.heatmap is not None,
            tiles=args.tiles,
            aggregation=args.aggregation,
            roi_file=args.roi,
            rule=args.rule,
            model_label=args.model_label,
        )
    except ValueError as exc:  # RoiError
        print(f"error: regions of interest: {exc}", file=sys.stderr)
        return 2
    try:
        validate_score_request(request)
        tls = None if args.local else tls_files(args)
    except (InvalidInput, TLSConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.local:
            result = score_local(args.model_root, request)
        else:
            result = score_remote(
                args.server, request, timeout=args.timeout, token=args.token, tls=tls
            )
    except Exception as exc:  # grpc.RpcError carries the status the server chose
        print(f"error: {describe_error(exc)}", file=sys.stderr)
        return 1
    if args.heatmap:
        args.heatmap.write_bytes(result.heatmap_png)
    if args.json:
        out = json_format.MessageToDict(result)
        out.pop("heatmapPng", None)
        print(json.dumps(out))
        return 0
    s = summary(result)
    probs = ", ".join(f"{p:.3f}" for p in result.probabilities)
    print(f"slide            {s['slide_id']}")
    print(f"tumor score      {result.tumor_score}   (p1..p3: {probs})")
    print(
        f"mitotic score    {result.mitotic_score}   ({result.mitosis_count} mitoses, "
        f"{result.mitoses_per_10hpf:g} per 10 HPF in the densest region)"
    )
    print(f"tiles scored     {result.tiles_scored}")
    print("models           " + ", ".join(f"{m.name} v{m.version}" for m in result.models))
    for w in result.warnings:
        print(f"warning          {w}")
    if args.heatmap:
        print(f"heatmap          {args.heatmap}")
    print(json.dumps(s))
    return 0
