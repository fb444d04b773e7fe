"""Fixtures of the offline Kubernetes checks: every render once per session, and a strict
kubernetes-validate with its schema files cached."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import pytest

from tests.deploy.manifests import K8S_VERSION, RENDER_NAMES, Obj, Render, render_all


@pytest.fixture(scope="session")
def renders() -> dict[str, Render]:
    """Every render (kustomize base and overlays, the chart's value sets), once."""
    return render_all()


@pytest.fixture(params=RENDER_NAMES)
def render(request: pytest.FixtureRequest, renders: dict[str, Render]) -> Render:
    return renders[request.param]


@pytest.fixture(scope="session")
def k8s_validate() -> Iterator[Callable[[Obj], str]]:
    """kubernetes_validate.validate, strict, pinned version, with its schema files cached (it
    re-reads the 1.4 MB definitions file for every object otherwise)."""
    import kubernetes_validate
    from kubernetes_validate import utils

    original = utils.schema_contents
    utils.schema_contents = functools.lru_cache(maxsize=None)(original)
    try:
        yield lambda obj: kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    finally:
        utils.schema_contents = original
