"""Scoring service settings (environment variables, documented defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from prolifscore.core.runtime.settings import (
    KafkaSettings,
    PreprocessSettings,
    RuntimeSettings,
    env,
    nested,
)


@dataclass(frozen=True)
class ScoringSettings:
    kafka: KafkaSettings = nested(KafkaSettings)
    runtime: RuntimeSettings = nested(RuntimeSettings)
    preprocess: PreprocessSettings = nested(PreprocessSettings)
    port: int = env(
        "PROLIF_SCORING_PORT",
        50051,
        "ScoringService gRPC port (+ health, reflection; 0 = any free)",
    )
    model_server: str = env(
        "PROLIF_MODEL_SERVER", "127.0.0.1:8500", "TF Serving (or local model server) gRPC address"
    )
    model_retries: int = env(
        "PROLIF_MODEL_RETRIES", 4, "Retries (exponential backoff) while the model server is down"
    )
    tumor_model: str = env("PROLIF_TUMOR_MODEL", "resnet50", "Model name of the tumor-score model")
    mitosis_model: str = env("PROLIF_MITOSIS_MODEL", "mitosis", "Model name of the mitosis model")
    tumor_model_label: str = env(
        "PROLIF_TUMOR_MODEL_LABEL",
        "",
        "Version label of the tumor model when a request names none (ScoreRequest.model_label; "
        "empty: the newest served version)",
    )
    mitosis_model_label: str = env(
        "PROLIF_MITOSIS_MODEL_LABEL",
        "",
        "Version label of the mitosis model (empty: the newest served version)",
    )
    predict_batch: int = env("PROLIF_PREDICT_BATCH", 32, "Tiles per Predict request")
    aggregation: str = env(
        "PROLIF_AGGREGATION",
        "mean",
        "Older name of the rule: mean (the model's rule below) or rounded_mean (the seed's)",
    )
    score_rule: str = env(
        "PROLIF_SCORE_RULE",
        "model",
        "Slide class from the mean tile probabilities: model (the export's cut points when it "
        "has them, else argmax), argmax, cutpoints or rounded_mean; a request may ask another",
    )
    mitosis_threshold: float = env(
        "PROLIF_MITOSIS_THRESHOLD",
        0.5,
        "Mitosis detection threshold where PROLIF_MODEL_METADATA_ROOT is not set; set it to "
        "the served detector's `threshold` (its export metadata, chosen on the training cases)",
    )
    model_metadata_root: str = env(
        "PROLIF_MODEL_METADATA_ROOT",
        "",
        "The model server's model root, read-only (optional): the served detector's exported "
        "threshold then replaces PROLIF_MITOSIS_THRESHOLD, and results flag untrained models",
    )
    nms_radius_um: float = env(
        "PROLIF_MITOSIS_NMS_UM", 8.0, "Detections closer than this merge into one mitosis"
    )
    hpf_area_mm2: float = env("PROLIF_HPF_AREA_MM2", 0.196, "Area of one high-power field")
    mitotic_thresholds: tuple[int, ...] = env(
        "PROLIF_MITOTIC_THRESHOLDS",
        (7, 14),
        "Mitoses per 10 HPF: <= first -> score 1, <= second -> 2, else 3",
    )
    ray_readers: int = env(
        "PROLIF_SCORING_RAY_READERS", 2, "Parallel Ray tasks reading tiles (0 = a local thread)"
    )
    store_results: bool = env(
        "PROLIF_SCORING_STORE_RESULTS",
        True,
        "Store every scoring (gRPC and Kafka) with its tiles and heatmap under the results root",
    )
    kafka_enabled: bool = env("PROLIF_SCORING_KAFKA", True, "Consume prolif.score.requests")
    topic_requests: str = env(
        "PROLIF_TOPIC_SCORE_REQUESTS", "prolif.score.requests", "Score requests"
    )
    topic_results: str = env("PROLIF_TOPIC_SCORE_RESULTS", "prolif.score.results", "Score results")
    group_id: str = env("PROLIF_SCORING_GROUP", "prolif-scoring", "Consumer group of batch scoring")
    auth_token: str = env(
        "PROLIF_AUTH_TOKEN", "", "Bearer token ScoringService calls must carry (empty = none)"
    )
    max_concurrent: int = env("PROLIF_SCORING_CONCURRENCY", 4, "gRPC calls scored at once")
