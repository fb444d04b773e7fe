"""Scoring service: `ScoringService` over gRPC for interactive clients, and Kafka batch scoring
(prolif.score.requests -> prolif.score.results). Entry point: `prolifscore-scoring`."""

from __future__ import annotations

import contextvars
import dataclasses
import hmac
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from prolifscore.core.grading.evaluation import SCORE_RULES
from prolifscore.core.grading.mitoses import MitosisGrading
from prolifscore.core.results import ResultStore
from prolifscore.core.runtime import metrics, tracing
from prolifscore.core.runtime.bus import Bus
from prolifscore.core.runtime.delivery import Transient
from prolifscore.core.runtime.failures import fail_slide, slide_failed
from prolifscore.core.runtime.service import KafkaWork, ServiceRuntime, configure, run_service
from prolifscore.core.runtime.validation import InvalidInput, carried_id, check_id, clip
from prolifscore.core.wsi.slide import SlideNotFound, SlidePathDenied, SlideUnreadable
from prolifscore.core.wsi.stain import StainFitError
from prolifscore.core.wsi.tfrecord import write_atomic
from prolifscore.scoring.config import ScoringSettings
from prolifscore.scoring.model_client import ModelError, Models, ModelUnavailable, PredictionClient
from prolifscore.scoring.scorer import (
    Cancelled,
    DeadlineExceeded,
    InvalidRequest,
    ScoringOptions,
    score_slide,
)
from prolifscore.v1 import scoring_pb2 as spb
from prolifscore.v1 import scoring_pb2_grpc

log = logging.getLogger(__name__)
NAME = "scoring"
SERVICE_NAME = spb.DESCRIPTOR.services_by_name["ScoringService"].full_name
_AGGREGATIONS = {
    "mean": spb.AGGREGATION_MEAN_PROBABILITY,
    "rounded_mean": spb.AGGREGATION_ROUNDED_MEAN_CLASS,
}

# What each failure means to a client: (gRPC code, whether it is the caller's fault).
ERROR_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (SlideNotFound, grpc.StatusCode.NOT_FOUND),
    (SlidePathDenied, grpc.StatusCode.PERMISSION_DENIED),
    (SlideUnreadable, grpc.StatusCode.FAILED_PRECONDITION),
    (StainFitError, grpc.StatusCode.FAILED_PRECONDITION),
    (ModelUnavailable, grpc.StatusCode.UNAVAILABLE),
    (ModelError, grpc.StatusCode.FAILED_PRECONDITION),
    (Cancelled, grpc.StatusCode.CANCELLED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
]


def status_for(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, ModelError) and exc.code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return grpc.StatusCode.DEADLINE_EXCEEDED  # the request's deadline ran out in Predict
    if isinstance(exc, ModelError) and exc.code == grpc.StatusCode.INVALID_ARGUMENT:
        return grpc.StatusCode.INVALID_ARGUMENT  # e.g. a model_label the model config lacks
    for kind, code in ERROR_CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def options_from(settings: ScoringSettings) -> ScoringOptions:
    if settings.aggregation not in _AGGREGATIONS:
        raise ValueError(f"PROLIF_AGGREGATION must be one of {sorted(_AGGREGATIONS)}")
    if settings.score_rule not in SCORE_RULES:
        raise ValueError(f"PROLIF_SCORE_RULE must be one of {list(SCORE_RULES)}")
    if len(settings.mitotic_thresholds) != 2 or not (
        0 <= settings.mitotic_thresholds[0] <= settings.mitotic_thresholds[1]
    ):
        raise ValueError(
            "PROLIF_MITOTIC_THRESHOLDS must be two ascending counts per 10 HPF, e.g. 7,14; "
            f"got {settings.mitotic_thresholds}"
        )
    low, high = settings.mitotic_thresholds
    return ScoringOptions(
        preprocess=settings.preprocess,
        tumor_model=settings.tumor_model,
        mitosis_model=settings.mitosis_model,
        tumor_label=settings.tumor_model_label,
        mitosis_label=settings.mitosis_model_label,
        predict_batch=settings.predict_batch,
        aggregation=_AGGREGATIONS[settings.aggregation],
        score_rule=SCORE_RULES[settings.score_rule],
        grading=MitosisGrading(
            threshold=settings.mitosis_threshold,
            nms_radius_um=settings.nms_radius_um,
            hpf_area_mm2=settings.hpf_area_mm2,
            score_thresholds=(low, high),
        ),
        ray_readers=settings.ray_readers,
        metadata_root=settings.model_metadata_root,
    )


class ScoringServicer(scoring_pb2_grpc.ScoringServiceServicer):
    def __init__(self, settings: ScoringSettings, models: Models) -> None:
        self.settings = settings
        self.models = models
        self.options = options_from(settings)
        self.roots = tuple(str(r) for r in settings.runtime.slide_roots)
        self._slots = threading.BoundedSemaphore(settings.max_concurrent)
        self.store = ResultStore(settings.runtime.results_root) if settings.store_results else None

    def score(
        self,
        request: spb.ScoreRequest,
        progress: Callable[[spb.ScoreProgress], None] | None = None,
        cancelled: Callable[[], bool] = lambda: False,
        deadline: float | None = None,
    ) -> spb.SlideScore:
        asked = spb.ScoreRequest()
        asked.CopyFrom(request)
        if self.store is not None:  # stored whole (tiles, heatmap) for the viewer and exports
            asked.include_tiles = asked.include_heatmap = True
        with (
            tracing.span("score slide") as span,
            self._slots,
            metrics.DURATION.labels(NAME, "slide").time(),
        ):
            result = score_slide(
                asked,
                slide_roots=self.roots,
                options=self.options,
                models=self.models,
                progress=progress,
                cancelled=cancelled,
                deadline=deadline,
            )
            span.set_attribute("prolif.slide_id", result.slide_id)
            span.set_attribute("prolif.tiles.scored", result.tiles_scored)
        metrics.SLIDES.labels(NAME, "scored").inc()
        metrics.TILES.labels(NAME, "scored").inc(result.tiles_scored)
        if self.store is not None:
            png = result.heatmap_png
            stored = self.store.save(result)
            result.heatmap_path = str(stored.with_suffix(".png")) if png else ""
            if not request.include_tiles:
                del result.tiles[:]
            if not request.include_heatmap:
                result.heatmap_png = b""
        return result

    def _fail(self, context: grpc.ServicerContext, exc: BaseException) -> None:
        code = status_for(exc)
        metrics.FAILURES.labels(NAME, code.name.lower()).inc()
        if code == grpc.StatusCode.INTERNAL:
            log.exception("scoring failed", exc_info=exc)
        else:
            log.info("request failed", extra={"code": code.name, "error": clip(str(exc))})
        context.abort(code, clip(str(exc)))  # short: a trailer, never an echo of the request

    @staticmethod
    def _deadline(context: grpc.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.time() + remaining

    def ScoreSlide(
        self, request: spb.ScoreRequest, context: grpc.ServicerContext
    ) -> spb.SlideScore:
        try:
            return self.score(
                request, cancelled=lambda: not context.is_active(), deadline=self._deadline(context)
            )
        except Exception as exc:
            self._fail(context, exc)
            raise  # unreachable: abort raises

    def StreamScoreSlide(
        self, request: spb.ScoreRequest, context: grpc.ServicerContext
    ) -> Iterator[spb.ScoreEvent]:
        events: queue.Queue[object] = queue.Queue()
        done = object()

        def work() -> None:
            try:
                result = self.score(
                    request,
                    progress=lambda p: events.put(spb.ScoreEvent(progress=p)),
                    cancelled=lambda: not context.is_active(),
                    deadline=self._deadline(context),
                )
                events.put(spb.ScoreEvent(result=result))
            except Exception as exc:
                events.put(exc)
            events.put(done)

        # In the call's context, so the scoring runs in its span (`core/runtime/tracing.py`).
        run = contextvars.copy_context().run
        threading.Thread(target=run, args=(work,), daemon=True, name="score-stream").start()
        while True:
            item = events.get()
            if item is done:
                return
            if isinstance(item, Exception):
                self._fail(context, item)
            yield item  # type: ignore[misc]


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on ScoringService calls; health and reflection
    stay open for probes."""

    def __init__(self, token: str) -> None:
        self._token = f"Bearer {token}".encode()

        def deny(_request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        method = handler_call_details.method
        if not method.startswith(f"/{SERVICE_NAME}/"):
            return continuation(handler_call_details)
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(given.encode(), self._token):
            return continuation(handler_call_details)
        return self._deny_stream if method.endswith("/StreamScoreSlide") else self._deny_unary


class BatchScorer:
    """Kafka batch scoring. A result is made durable as a JSON file named by request id
    before it is published and the offset committed; a redelivered request republishes the
    stored result instead of scoring again."""

    def __init__(self, settings: ScoringSettings, servicer: ScoringServicer, bus: Bus) -> None:
        self.settings = settings
        self.servicer = servicer
        self.bus = bus
        self.root = Path(settings.runtime.results_root)

    def handle(self, items: list[tuple[Any, spb.ScoreRequest]]) -> None:
        for record, request in items:
            if not request.request_id:  # deterministic, so a redelivery maps to the same result
                request.request_id = f"{record.topic}-{record.partition}-{record.offset}"
            # The request's trace (from its headers) goes on to the model calls and the result.
            with tracing.current(tracing.start_consumer("score request", record)):
                try:
                    check_id("request_id", request.request_id)  # it names the result files
                except InvalidInput as exc:
                    result = self._failed(record, request, grpc.StatusCode.INVALID_ARGUMENT, exc)
                else:
                    result = self._stored(request.request_id) or self._score(record, request)
                self.bus.publish(self.settings.topic_results, result.request_id, result)

    def _failed(
        self, record: Any, request: spb.ScoreRequest, code: grpc.StatusCode, exc: BaseException
    ) -> spb.ScoreResult:
        """The request's error result, its failed status and its dead letter; only fields that
        passed validation are repeated in them."""
        status = fail_slide(
            self.bus,
            record,
            str(exc),
            "request",
            slide_id=request.slide_id,
            path=request.path,
            run_id=request.request_id,
        )
        out = spb.ScoreResult(request_id=status.run_id, slide_id=carried_id(request.slide_id))
        out.error.code, out.error.message = code.name, status.reason
        return out

    def _stored(self, request_id: str) -> spb.ScoreResult | None:
        path = self.root / f"{request_id}.json"
        if not path.exists():
            return None
        return json_format.Parse(path.read_text(), spb.ScoreResult())

    def _score(self, record: Any, request: spb.ScoreRequest) -> spb.ScoreResult:
        out = spb.ScoreResult(request_id=request.request_id)
        try:
            score = self.servicer.score(request)  # stored per slide, heatmap beside it
            out.score.CopyFrom(score)
            out.slide_id = score.slide_id
        except Exception as exc:
            code = status_for(exc)
            if code == grpc.StatusCode.UNAVAILABLE:  # not the request's fault: redo it later
                raise Transient(f"model server unavailable: {exc}") from exc
            if code == grpc.StatusCode.INTERNAL:
                raise  # a bug, or this request: retried, then given up (`abandon`)
            out = self._failed(record, request, code, exc)
        self._store(out)
        return out

    def _store(self, out: spb.ScoreResult) -> None:
        if out.request_id:  # a validated id: it names the file
            write_atomic(
                self.root / f"{out.request_id}.json",
                json_format.MessageToJson(out, indent=None).encode(),
            )

    def abandon(self, record: Any, request: spb.ScoreRequest, reason: str) -> None:
        """The request was given up after PROLIF_MAX_ATTEMPTS (its record is dead-lettered by
        the consumer loop): its requester gets an INTERNAL error result, the slide a FAILED
        status."""
        if not request.request_id:
            request.request_id = f"{record.topic}-{record.partition}-{record.offset}"
        status = slide_failed(
            self.bus,
            reason,
            slide_id=request.slide_id,
            path=request.path,
            run_id=request.request_id,
        )
        out = spb.ScoreResult(request_id=status.run_id, slide_id=carried_id(request.slide_id))
        out.error.code, out.error.message = grpc.StatusCode.INTERNAL.name, status.reason
        self._store(out)
        self.bus.publish(self.settings.topic_results, out.request_id, out)


GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # A ScoreRequest is a path and options (a few KB at the fields' limits): 1 MiB lets the
    # servicer answer an oversize field with INVALID_ARGUMENT naming it; past that the transport
    # refuses the message (RESOURCE_EXHAUSTED) before any code runs.
    ("grpc.max_receive_message_length", 1024 * 1024),
]


def build(
    settings: ScoringSettings, models: Models | None = None
) -> tuple[ServiceRuntime, ScoringServicer]:
    """The runtime with ScoringService registered (not started): shared by main() and tests."""
    interceptors = [BearerTokenInterceptor(settings.auth_token)] if settings.auth_token else []
    runtime = ServiceRuntime(
        NAME,
        dataclasses.replace(settings.runtime, grpc_port=settings.port),
        grpc_options=GRPC_OPTIONS,
        max_workers=settings.max_concurrent + 4,
        interceptors=interceptors,
    )
    servicer = ScoringServicer(
        settings,
        models
        or PredictionClient(
            settings.model_server,
            retries=settings.model_retries,
            tls=settings.runtime,
        ),
    )
    scoring_pb2_grpc.add_ScoringServiceServicer_to_server(servicer, runtime.server)
    runtime.add_service(SERVICE_NAME)
    return runtime, servicer


def main() -> None:
    settings = configure(NAME, ScoringSettings)
    runtime, servicer = build(settings)
    work = KafkaWork(
        settings.kafka,
        consume=settings.topic_requests,
        produce=[settings.topic_results, settings.kafka.topic_status],
        group_id=settings.group_id,
        msg_type=spb.ScoreRequest,
        handler=lambda bus: BatchScorer(settings, servicer, bus),
    )
    try:
        run_service(runtime, work if settings.kafka_enabled else None, ray=settings.ray_readers)
    finally:
        servicer.models.close()


if __name__ == "__main__":
    main()
