"""What KubeRay v1.7.0's operator rejects although the CRD schema accepts it.

The CRD's openAPI schema (tests/test_k8s.py) checks field names and types. The operator checks
more in Go before it creates a RayCluster, and a RayService that breaks one of those rules never
gets a cluster: the reconcile stops with an InvalidRayServiceSpec event. `kuberay_errors` restates
those rules from ray-operator/controllers/ray/utils/validation.go (ValidateRayServiceMetadata,
ValidateRayServiceSpec, ValidateRayClusterSpec and the helpers they call, tag v1.7.0) and the
unique-group-name rule of ray-operator/pkg/webhooks/v1/raycluster_webhook.go, with the feature
gates at their defaults (off). `deployment_errors` adds what specserve's pods need on top:
resources on every Ray container, GPUs where the Serve config asks for them, /dev/shm left to
KubeRay. Every build of k8s/ (real kustomize) must pass both; each rule is shown to fire.
"""

from __future__ import annotations

import copy
import re

import pytest
import yaml
from k8s_helpers import BUILDS, build_all, rayservice

DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MAX_RAYSERVICE_NAME = 53 - 6  # MaxRayClusterNameLength - 6
AUTOSCALER_V2_ENV = "RAY_enable_autoscaler_v2"
UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}
START_RESOURCE_PARAMS = ("num-cpus", "num-gpus", "memory", "resources")


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env") or []}


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def _group_errors(name: str, g: dict, autoscaling: bool, v2: bool) -> list[str]:
    errs = []
    if not g["template"]["spec"].get("containers"):
        errs.append(f"worker group {name} should have at least one container")
    lo, hi = g.get("minReplicas"), g.get("maxReplicas")
    if not autoscaling and (lo is None or hi is None):
        errs.append(f"worker group {name} must set both minReplicas and maxReplicas when autoscaling is disabled")
    if (lo or 0) < 0 or (hi or 0) < 0:
        errs.append(f"worker group {name} has negative minReplicas/maxReplicas")
    if lo is not None and hi is not None and lo > hi:
        errs.append(f"worker group {name} has minReplicas {lo} greater than maxReplicas {hi}")
    if g.get("replicas") is not None and not (lo or 0) <= g["replicas"] <= (hi if hi is not None else 2**31):
        errs.append(f"worker group {name}: replicas {g['replicas']} is outside [minReplicas, maxReplicas]")
    params = g.get("rayStartParams") or {}
    if any(params.get(p) for p in START_RESOURCE_PARAMS) and g.get("resources"):
        errs.append(f"resource fields should not be set in both rayStartParams and Resources for {name} group")
    if "labels" in params:
        errs.append(f"rayStartParams['labels'] is not supported for {name} group")
    if g.get("idleTimeoutSeconds") is not None:
        if g["idleTimeoutSeconds"] < 0:
            errs.append(f"worker group {name}: idleTimeoutSeconds must be non-negative")
        if not v2:
            errs.append(f"worker group {name}: idleTimeoutSeconds is set, but autoscaler v2 is not enabled")
        if not autoscaling:  # not the operator's rule: without the autoscaler nothing reads it
            errs.append(f"worker group {name}: idleTimeoutSeconds without enableInTreeAutoscaling does nothing")
    if g.get("priority") and not v2:
        errs.append(f"worker group {name}: priority is only supported with autoscaler v2")
    if v2 and g["template"]["spec"].get("restartPolicy", "Never") != "Never":
        errs.append(f"restartPolicy for worker group {name} should be Never or unset when using autoscaler V2")
    if autoscaling and g.get("suspend"):
        errs.append(f"worker group {name} cannot be suspended with Autoscaler enabled")
    return errs


def _gcs_ft_errors(c: dict, annotations: dict, head_env: dict) -> list[str]:
    errs, ft = [], c.get("gcsFaultToleranceOptions")
    if annotations.get("ray.io/ft-enabled") and ft is not None:
        errs.append("ray.io/ft-enabled annotation and GcsFaultToleranceOptions are both set")
    ft_on = ft is not None or str(annotations.get("ray.io/ft-enabled", "")).lower() == "true"
    if not ft_on and "RAY_REDIS_ADDRESS" in head_env:
        errs.append("RAY_REDIS_ADDRESS is set which implicitly enables GCS fault tolerance, but GcsFaultToleranceOptions is not")
    if ft is not None:
        if c["headGroupSpec"].get("rayStartParams", {}).get("redis-password"):
            errs.append("cannot set `redis-password` in rayStartParams when GcsFaultToleranceOptions is enabled")
        for var in ("REDIS_PASSWORD", "RAY_REDIS_ADDRESS"):
            if var in head_env:
                errs.append(f"cannot set `{var}` env var in head Pod when GcsFaultToleranceOptions is enabled")
        if annotations.get("ray.io/external-storage-namespace"):
            errs.append("cannot set `ray.io/external-storage-namespace` annotation with GcsFaultToleranceOptions")
        if ft.get("backend", "redis") == "rocksdb":
            errs.append("the rocksdb GCS FT backend needs the GCSFaultToleranceEmbeddedStorage feature gate")
        elif ft.get("storage") is not None:
            errs.append("cannot set GcsFaultToleranceOptions.Storage when backend is 'redis'")
    if c["headGroupSpec"].get("rayStartParams", {}).get("redis-username") or "REDIS_USERNAME" in head_env:
        errs.append("cannot set redis username in rayStartParams or env - use GcsFaultToleranceOptions.RedisUsername")
    return errs


def _auth_errors(c: dict) -> list[str]:
    auth = c.get("authOptions") or {}
    errs = []
    if auth.get("enableK8sTokenAuth"):
        errs.append("K8s token auth mode is currently not supported for RayService")
    if auth.get("mode") == "token":
        if not c.get("rayVersion"):
            errs.append("authOptions.mode is 'token' but RayVersion was not specified")
        elif _version(c["rayVersion"]) < (2, 52, 0):
            errs.append(f"authOptions.mode is 'token' but minimum Ray version is 2.52.0, got {c['rayVersion']}")
    return errs


def kuberay_errors(rs: dict) -> list[str]:
    """The reasons KubeRay v1.7.0 would refuse this RayService (empty: it reconciles)."""
    meta, spec = rs["metadata"], rs["spec"]
    annotations = meta.get("annotations") or {}
    errs = []
    if len(meta["name"]) > MAX_RAYSERVICE_NAME or not DNS1035.match(meta["name"]):
        errs.append(f"RayService name {meta['name']!r} must be a DNS1035 label of at most {MAX_RAYSERVICE_NAME} characters")
    c = spec["rayClusterConfig"]
    head = c["headGroupSpec"]
    containers = head["template"]["spec"].get("containers") or []
    if not containers:
        return errs + ["headGroupSpec should have at least one container"]
    head_env = _env(containers[0])
    if any((head.get("rayStartParams") or {}).get(p) for p in START_RESOURCE_PARAMS) and head.get("resources"):
        errs.append("resource fields should not be set in both rayStartParams and Resources for Head group")
    autoscaling = c.get("enableInTreeAutoscaling") is True
    opts = c.get("autoscalerOptions") or {}
    v2 = opts.get("version") == "v2" or head_env.get(AUTOSCALER_V2_ENV, {}).get("value") in ("1", "true")
    names = [g["groupName"] for g in c.get("workerGroupSpecs") or []]
    errs += [f"worker group names must be unique: {n} is used twice" for n in sorted(set(names)) if names.count(n) > 1]
    # not enforced by the operator unless spec.networkPolicy is set, but pod and Service names embed them
    errs += [f"worker group name {n!r} is not a DNS1123 label" for n in names if not DNS1123.match(n)]
    for g in c.get("workerGroupSpecs") or []:
        errs += _group_errors(g["groupName"], g, autoscaling, v2)
    errs += _gcs_ft_errors(c, annotations, head_env)
    if not autoscaling and head_env.get(AUTOSCALER_V2_ENV, {}).get("value") in ("1", "true"):
        errs.append(f"{AUTOSCALER_V2_ENV} cannot be set when enableInTreeAutoscaling is false")
    if autoscaling and opts.get("version") and AUTOSCALER_V2_ENV in head_env:
        errs.append(f"both .spec.autoscalerOptions.version and head Pod env var {AUTOSCALER_V2_ENV} are set")
    if autoscaling and v2 and head["template"]["spec"].get("restartPolicy", "Never") != "Never":
        errs.append("restartPolicy for head Pod should be Never or unset when using autoscaler V2")
    if (opts.get("idleTimeoutSeconds") or 0) < 0:
        errs.append("autoscalerOptions.idleTimeoutSeconds must be non-negative")
    if "KUBERAY_GEN_AUTOSCALER_START_CMD" in _env(opts):
        errs.append("autoscalerOptions.env must not contain KUBERAY_GEN_AUTOSCALER_START_CMD")
    errs += _auth_errors(c)
    for gated in ("networkPolicy", "tlsOptions", "historyServerOptions"):
        if c.get(gated) is not None:
            errs.append(f"spec.{gated} requires a feature gate that is off by default")
    if (head.get("headService") or {}).get("metadata", {}).get("name"):
        errs.append("spec.rayClusterConfig.headGroupSpec.headService.metadata.name should not be set")
    kind = (spec.get("upgradeStrategy") or {}).get("type")
    if kind is not None and kind not in UPGRADE_TYPES:
        errs.append(f"Spec.UpgradeStrategy.Type value {kind} is invalid")
    if (spec.get("rayClusterDeletionDelaySeconds") or 0) < 0:
        errs.append("Spec.RayClusterDeletionDelaySeconds should be a non-negative integer")
    errs += _serve_config_errors(spec.get("serveConfigV2"))
    return errs


def _serve_config_errors(text) -> list[str]:
    """The operator hands serveConfigV2 to Serve's REST API, which checks it with ServeDeploySchema."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(yaml.safe_load(text or ""))
    except (ValidationError, yaml.YAMLError) as e:
        return [f"serveConfigV2 is not a valid Serve config: {str(e).splitlines()[0]}"]
    return []


def deployment_errors(rs: dict) -> list[str]:
    """What specserve's pods need beyond the operator's rules."""
    c = rs["spec"]["rayClusterConfig"]
    apps = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"]
    wants_gpu = set()  # custom resources of the replicas that ask for GPUs
    for app in apps:
        for part in ("target", "draft"):
            rep = ((app.get("args") or {}).get(part) or {}).get("replicas") or {}
            if rep.get("num_gpus"):
                wants_gpu |= set(rep.get("resources") or {})
    errs = []
    for g in [c["headGroupSpec"], *c.get("workerGroupSpecs", [])]:
        name = g.get("groupName", "head")
        ray = g["template"]["spec"]["containers"][0]
        res = ray.get("resources") or {}
        for side in ("requests", "limits"):
            missing = [r for r in ("cpu", "memory") if r not in (res.get(side) or {})]
            if missing:
                errs.append(f"{name}: the ray container sets no {side} for {', '.join(missing)}")
        if wants_gpu & set(g.get("resources") or {}):
            gpus = [(res.get(side) or {}).get("nvidia.com/gpu") for side in ("requests", "limits")]
            if not all(gpus) or gpus[0] != gpus[1]:
                errs.append(f"{name}: Serve asks for GPUs there, so requests and limits must name nvidia.com/gpu alike")
        if any(m.get("mountPath") == "/dev/shm" for m in ray.get("volumeMounts") or []):
            errs.append(f"{name}: mounts its own /dev/shm (KubeRay sizes one from the memory limit when none is given)")
    return errs


@pytest.fixture(scope="module")
def builds():
    return build_all()


@pytest.mark.parametrize("name", BUILDS)
def test_kuberay_would_reconcile_every_build(builds, name):
    rs = rayservice(builds[name])
    assert kuberay_errors(rs) == [], name
    assert deployment_errors(rs) == [], name


def _set(doc: dict, path: str, value) -> dict:
    """A copy of doc with the dotted path set (list indexes are numbers; value None deletes)."""
    doc = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node = doc
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    if value is None:
        del node[int(last) if isinstance(node, list) else last]
    else:
        node[int(last) if isinstance(node, list) else last] = value
    return doc


_C = "spec.rayClusterConfig."
_W0 = _C + "workerGroupSpecs.0."
_HEADC = _C + "headGroupSpec.template.spec.containers.0."
_W0C = _W0 + "template.spec.containers.0."


@pytest.mark.parametrize("path,value,words", [
    (_C + "autoscalerOptions.version", "v1", "autoscaler v2 is not enabled"),
    (_C + "autoscalerOptions.version", None, "autoscaler v2 is not enabled"),
    (_C + "enableInTreeAutoscaling", False, "without enableInTreeAutoscaling"),
    (_W0 + "groupName", "target", "must be unique"),
    (_W0 + "groupName", "Draft_1", "DNS1123"),
    (_W0 + "minReplicas", 9, "greater than maxReplicas"),
    (_W0 + "replicas", 9, "outside [minReplicas, maxReplicas]"),
    (_W0 + "rayStartParams", {"num-gpus": "1"}, "both rayStartParams and Resources"),
    (_W0 + "template.spec.restartPolicy", "Always", "restartPolicy for worker group"),
    (_HEADC + "env", [{"name": "RAY_enable_autoscaler_v2", "value": "1"}], "are set"),
    (_HEADC + "env", [{"name": "RAY_REDIS_ADDRESS", "value": "r:6379"}], "implicitly enables"),
    (_C + "rayVersion", "2.50.0", "minimum Ray version is 2.52.0"),
    (_C + "authOptions.enableK8sTokenAuth", True, "not supported for RayService"),
    (_C + "networkPolicy", {"mode": "DenyAll"}, "feature gate"),
    ("metadata.name", "spec-serve.v2", "DNS1035"),
    ("spec.upgradeStrategy.type", "Rolling", "is invalid"),
    ("spec.serveConfigV2", "applications: [{name: x}]", "not a valid Serve config"),
    ("spec.serveConfigV2", "proxy_location: Nowhere\napplications: []", "not a valid Serve config"),
])
def test_each_operator_rule_fires(builds, path, value, words):
    rs = _set(rayservice(builds["base"]), path, value)
    errs = kuberay_errors(rs)
    assert any(words in e for e in errs), errs


@pytest.mark.parametrize("path,value,words", [
    ("metadata.annotations", {"ray.io/ft-enabled": "true"}, "both set"),
    (_HEADC + "env", [{"name": "REDIS_PASSWORD", "value": "x"}], "`REDIS_PASSWORD` env var"),
    (_C + "headGroupSpec.rayStartParams.redis-password", "x", "`redis-password`"),
    (_C + "gcsFaultToleranceOptions.backend", "rocksdb", "feature gate"),
    (_C + "gcsFaultToleranceOptions.storage", {"size": "1Gi"}, "backend is 'redis'"),
])
def test_each_gcs_fault_tolerance_rule_fires(builds, path, value, words):
    rs = rayservice(builds["gcs-ft"])
    assert rs["spec"]["rayClusterConfig"].get("gcsFaultToleranceOptions"), "gcs-ft sets gcsFaultToleranceOptions"
    errs = kuberay_errors(_set(rs, path, value))
    assert any(words in e for e in errs), errs


@pytest.mark.parametrize("path,value,words", [
    (_W0C + "resources.limits", {"cpu": "1"}, "no limits for memory"),
    (_HEADC + "resources", None, "no requests for cpu, memory"),
    (_W0C + "resources.limits.nvidia.com/gpu", None, "nvidia.com/gpu alike"),
    (_W0C + "volumeMounts", [{"name": "dshm", "mountPath": "/dev/shm"}], "/dev/shm"),
])
def test_each_deployment_rule_fires(builds, path, value, words):
    rs = rayservice(builds["base"])
    if path.endswith("nvidia.com/gpu"):  # a key with dots: set it by hand
        rs = copy.deepcopy(rs)
        del rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    else:
        rs = _set(rs, path, value)
    errs = deployment_errors(rs)
    assert any(words in e for e in errs), errs
