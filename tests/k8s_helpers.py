"""What the Kubernetes tests share: the builds of k8s/ made by real kustomize, and accessors.

Every build is `kubectl kustomize DIR` (the kustomize built into kubectl, as `kubectl apply -k`
uses it). Without kubectl the tests fail instead of skipping: a manifest nobody built is untested.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deployments.config import AppConfig
from specserve.tools import k8s

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
SERVE_YAML = ROOT / "deployments" / "serve_config.yaml"
BUILDS = {
    "base": K8S / "base",
    "gpu": K8S / "overlays" / "gpu",
    "cpu-demo": K8S / "overlays" / "cpu-demo",
    "gcs-ft": K8S / "overlays" / "gcs-ft",
    "models-pvc": K8S / "overlays" / "models-pvc",
}
# the `specserve k8s render` overlay whose serveConfigV2 each build carries
RENDERED = {"base": "base", "gpu": "gpu", "cpu-demo": "cpu-demo", "gcs-ft": "gpu", "models-pvc": "gpu"}
RAY = "ray.io/v1", "RayService"
FAST_YAML = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's safe loader where PyYAML has it


def key(doc: dict) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def by_key(docs: list[dict]) -> dict[str, dict]:
    out = {key(d): d for d in docs}
    assert len(out) == len(docs), "two resources with one kind/name"
    return out


def kustomize(d: Path) -> dict[str, dict]:
    """`kubectl kustomize d`, as {kind/name: resource}; fails (never skips) without kubectl."""
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl is not on PATH: the k8s tests build every overlay with its kustomize "
                    "(install kubectl; no separate kustomize binary is needed)")
    out = subprocess.run(["kubectl", "kustomize", str(d)], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise AssertionError(f"kubectl kustomize {d} failed: {out.stderr}")
    return by_key([x for x in yaml.load_all(out.stdout, Loader=FAST_YAML) if x])


class Builds(dict):
    """{build name: its resources}, each built on first use."""

    def __missing__(self, name: str) -> dict[str, dict]:
        self[name] = kustomize(BUILDS[name])
        return self[name]


def build_all() -> Builds:
    return Builds()


def rayservice(build: dict[str, dict]) -> dict:
    return build["RayService/specserve"]


def cluster(build) -> dict:
    return rayservice(build)["spec"]["rayClusterConfig"]


def serve_config(build) -> dict:
    return yaml.safe_load(rayservice(build)["spec"]["serveConfigV2"])


def app_config(build) -> AppConfig:
    (app,) = [a for a in serve_config(build)["applications"] if a["import_path"] == k8s.APP_IMPORT]
    return AppConfig.model_validate(app["args"])


def groups(build) -> dict[str, dict]:
    return {g["groupName"]: g for g in cluster(build)["workerGroupSpecs"]}


def ray_pods(build) -> list[dict]:
    """The head group and every worker group (each has a pod `template`)."""
    c = cluster(build)
    return [c["headGroupSpec"], *c["workerGroupSpecs"]]
