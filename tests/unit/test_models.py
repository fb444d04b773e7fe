"""The model export contract: TF Serving layout, uint8 `tiles` signature of any tile size,
documented outputs, metadata marking untrained models, atomic versions, weights errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
from prolifscore.core.models.architectures import (  # noqa: E402
    WeightsError,
    build_mitosis_model,
    build_tumor_model,
    mitosis_patch_model,
)
from prolifscore.core.models.contract import (  # noqa: E402
    MITOSIS_STRIDE,
    TUMOR_MODEL,
    preprocess_mitosis,
    preprocess_tumor,
)
from prolifscore.core.models.export import (  # noqa: E402
    export_model,
    export_untrained,
    list_versions,
    read_metadata,
)


def _tiles(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tumor_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    """One small (64 px) tumor export shared by the module: ResNet50 export takes seconds."""
    model = build_tumor_model(input_size=64)
    root = tmp_path_factory.mktemp("models")
    path = export_model(model, "tumor", root, metadata={"run": "test"})
    return model, path


def test_tumor_signature_contract(tumor_export: tuple[object, Path]) -> None:
    model, path = tumor_export
    assert path.name == "1" and path.parent.name == TUMOR_MODEL
    assert (path / "saved_model.pb").is_file() and (path / "variables").is_dir()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # temp dir renamed

    fn = tf.saved_model.load(str(path)).signatures["serving_default"]
    (spec,) = fn.structured_input_signature[1].values()
    assert list(fn.structured_input_signature[1]) == ["tiles"]
    assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, None, None, 3]
    assert list(fn.structured_outputs) == ["probabilities"]

    for n, h, w in ((2, 64, 64), (3, 100, 120), (1, 256, 256)):
        probs = fn(tiles=tf.constant(_tiles(n, h, w)))["probabilities"].numpy()
        assert probs.shape == (n, 3) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)

    # No train/serve skew: the Keras model on `preprocess_tumor` output gives the same numbers.
    tiles = _tiles(2, 80, 80, seed=3)
    direct = model(preprocess_tumor(tiles, 64), training=False).numpy()  # type: ignore[operator]
    served = fn(tiles=tf.constant(tiles))["probabilities"].numpy()
    np.testing.assert_allclose(served, direct, rtol=1e-4, atol=1e-6)


def test_tumor_metadata(tumor_export: tuple[object, Path]) -> None:
    _, path = tumor_export
    meta = read_metadata(path)
    assert meta["kind"] == "tumor" and meta["model"] == "resnet50" and meta["version"] == 1
    assert meta["input_size"] == 64 and meta["classes"] == 3
    assert meta["trained"] is False  # only training may say otherwise
    assert meta["run"] == "test" and meta["created"].endswith("Z")
    assert read_metadata(path.parent) == {}  # not a version folder: no metadata


def test_mitosis_map_contract(tmp_path: Path) -> None:
    path = export_untrained(tmp_path, "mitosis")
    meta = read_metadata(path)
    assert meta["trained"] is False and meta["kind"] == "mitosis"
    assert meta["stride"] == MITOSIS_STRIDE == 8 and meta["offset"] == 3.5

    fn = tf.saved_model.load(str(path)).signatures["serving_default"]
    assert list(fn.structured_outputs) == ["mitosis_map"]
    for h, w in ((64, 64), (256, 256), (100, 120)):
        out = fn(tiles=tf.constant(_tiles(2, h, w)))["mitosis_map"].numpy()
        assert out.shape == (2, -(-h // 8), -(-w // 8)) and out.dtype == np.float32
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0

    detector = build_mitosis_model()
    patch = mitosis_patch_model(detector)
    assert patch.output_shape == (None, 1)
    # The patch readout is the centre of the detector's own map: same weights, same numbers.
    x = preprocess_mitosis(_tiles(2, 64, 64))
    heat = detector(x, training=False).numpy()[..., 0]
    np.testing.assert_allclose(
        patch(x, training=False).numpy()[:, 0], heat[:, 3:5, 3:5].mean(axis=(1, 2)), rtol=1e-5
    )


def test_versions_are_atomic_and_never_collide(tmp_path: Path) -> None:
    first = export_untrained(tmp_path, "mitosis", name="det")
    second = export_untrained(tmp_path, "mitosis", name="det", seed=1)
    assert (first.name, second.name) == ("1", "2")
    (tmp_path / "det" / "3" / "variables").mkdir(parents=True)  # someone's half-written copy
    assert list_versions(tmp_path, "det") == [1, 2]  # incomplete: not a version
    third = export_untrained(tmp_path, "mitosis", name="det")
    assert third.name == "4"  # ... but its number is taken
    with pytest.raises(FileExistsError):
        export_untrained(tmp_path, "mitosis", name="det", version=2)
    assert list_versions(tmp_path, "det") == [1, 2, 4]
    assert not [p for p in (tmp_path / "det").iterdir() if p.name.startswith(".")]
    assert list_versions(tmp_path, "missing") == []


def test_untrained_is_always_marked(tmp_path: Path) -> None:
    path = export_untrained(tmp_path, "mitosis", metadata={"trained": True})
    assert read_metadata(path)["trained"] is False


@pytest.mark.slow
def test_weights_errors_are_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    two_class = build_tumor_model(input_size=32, classes=2)
    weights = tmp_path / "two_class.weights.h5"
    two_class.save_weights(str(weights))

    with pytest.raises(WeightsError, match=r"does not fit.*\(2048, 3\).*\(2048, 2\)"):
        build_tumor_model(input_size=32, weights=str(weights))
    with pytest.raises(WeightsError, match="does not exist"):
        build_tumor_model(weights=str(tmp_path / "missing.h5"))

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty-keras-home"))
    with pytest.raises(WeightsError, match=r"not available offline.*weights=/path"):
        build_tumor_model(weights="imagenet")
    with pytest.raises(WeightsError, match="no ImageNet weights"):
        build_mitosis_model(weights="imagenet")

    # A backbone-only file (like Keras' ImageNet "notop" h5) loads under any head.
    backbone_file = tmp_path / "backbone.weights.h5"
    two_class.get_layer("resnet50").save_weights(str(backbone_file))
    three = build_tumor_model(input_size=32, weights=str(backbone_file), classes=3)
    np.testing.assert_array_equal(
        three.get_layer("resnet50").get_weights()[0],
        two_class.get_layer("resnet50").get_weights()[0],
    )
