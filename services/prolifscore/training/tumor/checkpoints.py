"""Checkpoints: the files of one, where the newest lies, and the two backends' report /
restore calls behind one interface (`Session`), so the loop is written once for both."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"
WEIGHTS_FILE = "model.weights.h5"
BEST_FILE = "best.weights.h5"
OPTIMIZER_FILE = "optimizer.npz"


class Session:
    """A worker's place in the run (rank, world size), its checkpoint to resume from, and
    where each epoch's metrics and checkpoint go."""

    rank = 0
    world_size = 1

    def get_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        raise NotImplementedError

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        raise NotImplementedError


class RayTrainSession(Session):
    """Ray Train's own session (`ray.train.report`, `ray.train.get_checkpoint`)."""

    def __init__(self) -> None:
        import ray.train

        self._train = ray.train
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()

    @contextlib.contextmanager
    def get_checkpoint(self) -> Iterator[Path | None]:
        ckpt = self._train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield Path(d)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        ckpt = (
            self._train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        )
        self._train.report(metrics, checkpoint=ckpt)


class ActorSession(Session):
    """Ray Train's contract on a plain directory: `checkpoint_<epoch>` folders under the
    storage path, renamed into place when complete, the `num_to_keep` newest kept."""

    def __init__(self, storage: Path, num_to_keep: int = 2) -> None:
        self.storage = storage
        self.num_to_keep = num_to_keep
        storage.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def get_checkpoint(self) -> Iterator[Path | None]:
        yield latest_checkpoint(self.storage)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        with open(self.storage / "result.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if checkpoint_dir is None:
            return
        epoch = int(metrics["epoch"])
        tmp = self.storage / f".tmp-{uuid.uuid4().hex[:8]}"
        shutil.copytree(checkpoint_dir, tmp)
        final = self.storage / f"checkpoint_{epoch:06d}"
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        kept = sorted(self.storage.glob("checkpoint_*"))
        for old in kept[: -self.num_to_keep]:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(storage: Path) -> Path | None:
    """The checkpoint with the most completed epochs under a run's storage (either backend's
    layout: a folder holding our `state.json`, up to two levels down)."""
    if not storage.is_dir():
        return None
    best: tuple[int, float, Path] | None = None
    for state in [*storage.glob(f"*/{STATE_FILE}"), *storage.glob(f"*/*/{STATE_FILE}")]:
        if any(part.startswith(".tmp") for part in state.parts[-3:]):
            continue
        try:
            epoch = int(json.loads(state.read_text())["epoch"])
        except (OSError, ValueError, KeyError):
            continue
        key = (epoch, state.stat().st_mtime, state.parent)
        if best is None or key[:2] > best[:2]:
            best = key
    return best[2] if best else None


def session_for(backend: str, storage: Path) -> Session:
    """The session of a worker on `backend` ("ray_train" or "ray_actor")."""
    if backend == "ray_train":
        return RayTrainSession()
    return ActorSession(storage)
