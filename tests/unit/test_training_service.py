"""The training service's request handling: profiles and overrides reach the run's config, every
failure is reported once (error on `prolif.models` + dead letter) and never retried in a loop,
and a redelivered request republishes its stored result instead of training again."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from prolifscore.core.runtime.settings import load
from prolifscore.training.config import TrainingSettings
from prolifscore.training.detector import train as detector_train
from prolifscore.training.detector.config import MitosisTrainConfig
from prolifscore.training.detector.regions import DatasetError as MitosisDatasetError
from prolifscore.training.runner import QUICK_MITOSIS, QUICK_TUMOR, TrainingFailed, run_training
from prolifscore.training.server import TrainingService
from prolifscore.training.tumor import train as tumor_train
from prolifscore.training.tumor.config import TrainingError, TumorTrainConfig
from prolifscore.v1 import training_pb2 as tpb


class FakeBus:
    service = "training"

    def __init__(self) -> None:
        self.published: list[tuple[str, str, Any]] = []
        self.dead: list[str] = []

    def publish(self, topic: str, key: str, message: Any) -> None:
        self.published.append((topic, key, message))

    def dead_letter(self, record: Any, reason: str, service: str | None = None) -> None:
        self.dead.append(reason)


def settings(tmp_path: Path) -> TrainingSettings:
    return load(
        TrainingSettings,
        environ={},
        model_root=tmp_path / "models",
        runs_root=tmp_path / "runs",
    )


def record(offset: int = 0) -> SimpleNamespace:
    return SimpleNamespace(topic="prolif.train.requests", partition=0, offset=offset)


def test_quick_profile_and_epochs_reach_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}

    def fake_tumor(config: TumorTrainConfig, shards: Any, *args: Any, **kw: Any) -> None:
        seen["tumor"] = config
        raise TrainingError("stop here")

    def fake_mitosis(config: MitosisTrainConfig, *args: Any) -> None:
        seen["mitosis"] = config
        raise MitosisDatasetError("stop here")

    monkeypatch.setattr(tumor_train, "train_tumor", fake_tumor)
    monkeypatch.setattr(detector_train, "train_mitosis", fake_mitosis)
    monkeypatch.setattr("prolifscore.training.runner.labelled_shards", lambda dataset: [])
    s = settings(tmp_path)
    for epochs in (0, 1):
        for model in ("resnet50", "mitosis"):
            req = tpb.TrainRequest(
                request_id="r", model=model, dataset="x", profile="quick", epochs=epochs
            )
            with pytest.raises(TrainingFailed, match="stop here"):
                run_training(req, s)
        assert seen["tumor"].finetune_epochs == (epochs or QUICK_TUMOR["finetune_epochs"])
        assert seen["tumor"].steps_per_epoch == QUICK_TUMOR["steps_per_epoch"]
        assert seen["tumor"].input_size == 64
        assert seen["mitosis"].epochs == (epochs or QUICK_MITOSIS["epochs"])
    full = tpb.TrainRequest(request_id="r", model="resnet50", dataset="x", input_size=96)
    with pytest.raises(TrainingFailed):
        run_training(full, s)
    assert seen["tumor"].input_size == 96
    assert seen["tumor"].steps_per_epoch == TumorTrainConfig().steps_per_epoch


def test_every_failure_is_reported_once_and_not_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bus = FakeBus()
    service = TrainingService(settings(tmp_path), bus)  # type: ignore[arg-type]
    calls: list[str] = []

    def crashes(request: tpb.TrainRequest, s: TrainingSettings) -> None:
        calls.append(request.request_id)
        raise KeyError("a bug")

    monkeypatch.setattr("prolifscore.training.server.run_training", crashes)
    bad = tpb.TrainRequest(request_id="bad-model", model="vgg16", dataset="x")
    crash = tpb.TrainRequest(request_id="crash", model="resnet50", dataset="x")
    service.handle([(record(0), crash)])
    monkeypatch.setattr("prolifscore.training.server.run_training", run_training)
    service.handle([(record(1), bad)])
    errors = {m.request_id: m.error for _, _, m in bus.published}
    assert errors["crash"] == "internal error: KeyError: 'a bug'"
    assert "model must be 'resnet50' or 'mitosis'" in errors["bad-model"]
    assert len(bus.dead) == 2

    # Redelivery (the consumer died before committing): the stored outcome is republished.
    monkeypatch.setattr("prolifscore.training.server.run_training", crashes)
    service.handle([(record(0), crash)])
    assert calls == ["crash"]
    assert bus.published[-1][2].error == errors["crash"] and len(bus.dead) == 2


def test_a_request_without_id_is_named_by_its_offset(tmp_path: Path) -> None:
    bus = FakeBus()
    service = TrainingService(settings(tmp_path), bus)  # type: ignore[arg-type]
    service.handle([(record(7), tpb.TrainRequest(model="resnet50"))])
    message = bus.published[0][2]
    assert message.request_id == "prolif.train.requests-0-7"
    assert message.error == "dataset is required"
    assert (tmp_path / "runs" / "prolif.train.requests-0-7" / "published.json").is_file()
