"""The Kubernetes manifests (k8s/): they build, validate, and say what specserve needs.

No cluster and no network: every build (base, overlays gpu, cpu-demo and gcs-ft) is made by real
kustomize (`kubectl kustomize`, tests/k8s_helpers.py: the tests fail without kubectl) and every
manifest is checked against the Kubernetes schemas of one pinned version (the kubernetes-validate
package ships them) or, for the RayService, against the KubeRay CRD schema committed under
k8s/schema/ (made strict: an unknown field fails, as with `kubectl apply --validate=strict`); its
serveConfigV2 against Ray's ServeDeploySchema and specserve's AppConfig. Each overlay must equal
its parent plus exactly its intended changes (`INTENDED`). What the operator checks beyond the
schema is tests/test_k8s_rules.py; Redis, the NetworkPolicy and the images are
tests/test_k8s_lockdown.py and tests/test_k8s_image.py.
"""

from __future__ import annotations

import copy
import fnmatch
import re
import shutil
from pathlib import Path

import pytest
import yaml
from k8s_helpers import (BUILDS, FAST_YAML, K8S, RAY, RENDERED, ROOT, SERVE_YAML, app_config, build_all, groups, key,
                         kustomize, rayservice, serve_config)

from specserve.tools import k8s

KUBERNETES_VERSION = "1.34"  # the Kubernetes API the standard kinds are validated against
CRD_SCHEMA = K8S / "schema" / "kuberay-v1.7.0-rayservice-v1.openapi.yaml"
KUBERAY_VERSION = "v1.7.0"

# What each overlay may change in the build it is made from (PARENT), and must change (every
# pattern matches at least one changed leaf). Paths are kind/name/path/to/leaf; `*` also matches `/`.
PARENT = {"gpu": "base", "cpu-demo": "base", "gcs-ft": "gpu", "models-pvc": "gpu"}
ADDED = {"models-pvc": {"PersistentVolumeClaim/specserve-models", "Job/specserve-models-prepare"}}
_RS = "RayService/specserve/spec"
_WG = _RS + "/rayClusterConfig/workerGroupSpecs/*/template/spec"
_HEAD = _RS + "/rayClusterConfig/headGroupSpec/template/spec"
_IMAGES = [_HEAD + "/containers/0/image", _WG + "/containers/0/image", _WG + "/initContainers/0/image"]
INTENDED = {
    "gpu": [_RS + "/serveConfigV2", *_IMAGES, _RS + "/rayClusterConfig/workerGroupSpecs/*/maxReplicas"],
    "cpu-demo": [_RS + "/serveConfigV2", *_IMAGES,
                 _HEAD + "/containers/0/resources/*", _WG + "/containers/0/resources/*",
                 _WG + "/nodeSelector*", _WG + "/tolerations*"],
    "gcs-ft": [_RS + "/rayClusterConfig/gcsFaultToleranceOptions/*"],
    "models-pvc": [_WG + "/initContainers/0/*", _WG + "/volumes/0/*", _WG + "/containers/0/volumeMounts/0/readOnly"],
}


@pytest.fixture(scope="module")
def builds():
    return build_all()


# ---------------------------------------------------------------------------- builds


def test_every_overlay_directory_is_a_tested_build():
    on_disk = {p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file()}
    assert on_disk == set(BUILDS) - {"base"} == set(INTENDED) == set(PARENT)


def _leaves(x, path=()):
    if isinstance(x, dict) and x:
        for k, v in x.items():
            yield from _leaves(v, path + (str(k),))
    elif isinstance(x, list) and x:
        for i, v in enumerate(x):
            yield from _leaves(v, path + (str(i),))
    else:
        yield "/".join(path), x


def _changed(a: dict, b: dict) -> set[str]:
    la, lb = dict(_leaves(a)), dict(_leaves(b))
    return {p for p in la.keys() | lb.keys() if la.get(p, ...) != lb.get(p, ...)}


@pytest.mark.parametrize("overlay", INTENDED)
def test_overlays_change_their_parent_only_where_intended(builds, overlay):
    base, over = builds[PARENT[overlay]], builds[overlay]
    assert set(over) == set(base) | ADDED.get(overlay, set()), "an overlay adds or drops resources"
    changed = set().union(*({f"{k}/{p}" for p in _changed(base[k], over[k])} for k in base))
    allowed = INTENDED[overlay]
    unintended = sorted(p for p in changed if not any(fnmatch.fnmatchcase(p, a) for a in allowed))
    assert not unintended, f"{overlay} changes more than intended: {unintended}"
    missing = [a for a in allowed if not any(fnmatch.fnmatchcase(p, a) for p in changed)]
    assert not missing, f"{overlay} no longer changes {missing}"


def test_a_reordered_worker_group_breaks_the_overlay_build(tmp_path):
    shutil.copytree(K8S, tmp_path / "k8s")
    rs = tmp_path / "k8s" / "base" / "rayservice.yaml"
    doc = yaml.safe_load(rs.read_text())
    doc["spec"]["rayClusterConfig"]["workerGroupSpecs"].reverse()
    rs.write_text(yaml.safe_dump(doc))
    with pytest.raises(AssertionError, match="testing value"):
        kustomize(tmp_path / "k8s" / "overlays" / "gpu")


# ---------------------------------------------------------------------------- schemas


def _strict(schema):
    """The CRD schema with additionalProperties: false wherever it lists properties and does not
    keep unknown fields: what the API server prunes silently, this rejects."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(x) for x in schema]
    return schema


@pytest.fixture(scope="module")
def rayservice_validator():
    import jsonschema

    text = CRD_SCHEMA.read_text()
    assert KUBERAY_VERSION in text.splitlines()[0], "the schema's header names its KubeRay version"
    return jsonschema.Draft7Validator(_strict(yaml.load(text, Loader=FAST_YAML)))


@pytest.mark.parametrize("name", BUILDS)
def test_standard_kinds_validate_against_the_kubernetes_schemas(builds, name):
    import kubernetes_validate

    standard = [d for d in builds[name].values() if (d["apiVersion"], d["kind"]) != RAY]
    assert {d["kind"] for d in standard} >= {"Service", "StatefulSet", "NetworkPolicy"}
    for doc in standard:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {key(doc)} at {'/'.join(map(str, e.path))}: {e.message}")


@pytest.mark.parametrize("name", BUILDS)
def test_rayservice_validates_against_the_kuberay_crd(builds, rayservice_validator, name):
    rs = rayservice(builds[name])
    assert (rs["apiVersion"], rs["kind"]) == RAY
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in rayservice_validator.iter_errors(rs)]
    assert not errors, f"{name}: {errors}"
    assert set(rs["metadata"]) <= {"name", "labels", "annotations"}


def test_the_crd_check_is_strict(builds, rayservice_validator):
    rs = copy.deepcopy(rayservice(builds["base"]))
    rs["spec"]["rayClusterConfig"]["enableInTreeAutoScaling"] = True  # a typo the API server would drop
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "4"
    messages = " ".join(e.message for e in rayservice_validator.iter_errors(rs))
    assert "enableInTreeAutoScaling" in messages and "'4' is not of type 'integer'" in messages


@pytest.mark.parametrize("name", BUILDS)
def test_serve_config_v2_is_the_rendered_serve_config(builds, name):
    from ray.serve.schema import ServeDeploySchema

    from deployments.app import build_app

    text = rayservice(builds[name])["spec"]["serveConfigV2"]
    assert text == k8s.render(SERVE_YAML, RENDERED[name])
    raw = yaml.safe_load(text)
    ServeDeploySchema.model_validate(raw)
    cfg = app_config(builds[name])
    assert build_app(cfg) is not None  # binds the graph: Serve checks every deployment's options
    local = yaml.safe_load(SERVE_YAML.read_text())
    assert raw["grpc_options"] == local["grpc_options"]
    assert [a["name"] for a in raw["applications"]] == [a["name"] for a in local["applications"]]
    assert raw["http_options"]["host"] == "0.0.0.0" and raw["proxy_location"] == "EveryNode"


# ---------------------------------------------------------------------------- one source of truth


def test_committed_manifests_are_not_stale():
    stale = k8s.stale_files(ROOT)
    assert not stale, f"stale: {[str(p) for p in stale]}; run `specserve k8s render`"


def _checkout(tmp_path: Path) -> Path:
    (tmp_path / "deployments").mkdir()
    shutil.copy(SERVE_YAML, tmp_path / "deployments")
    shutil.copytree(K8S, tmp_path / "k8s")
    return tmp_path


def test_render_check_names_stale_files_and_render_fixes_them(tmp_path, capsys):
    root = _checkout(tmp_path)
    assert k8s.main(["render", "--check", "--root", str(root)]) == 0
    serve = root / "deployments" / "serve_config.yaml"
    serve.write_text(serve.read_text().replace("session_ttl_s: 86400", "session_ttl_s: 3600"))
    capsys.readouterr()
    assert k8s.main(["render", "--check", "--root", str(root)]) == 1
    err = capsys.readouterr().err
    for p in ("k8s/base/rayservice.yaml", "k8s/overlays/gpu/serve-config.patch.yaml",
              "k8s/overlays/cpu-demo/serve-config.patch.yaml"):
        assert f"stale: {p}" in err
    assert k8s.main(["render", "--root", str(root)]) == 0
    assert k8s.main(["render", "--check", "--root", str(root)]) == 0
    for name, d in BUILDS.items():
        cfg = app_config(kustomize(root / d.relative_to(ROOT)))
        assert cfg.session_ttl_s == 3600, name
    # only the serveConfigV2 block of the hand-written base file changed
    before, after = (K8S / "base" / "rayservice.yaml").read_text(), (root / "k8s/base/rayservice.yaml").read_text()
    assert [line for line in after.splitlines() if "session_ttl_s" not in line] == \
        [line for line in before.splitlines() if "session_ttl_s" not in line]


@pytest.mark.parametrize("edit,words", [
    ({"cpu-demo": {"args": {"target": {"dtype": "fp8"}}}}, "dtype"),
    ({"gpu": {"args": {"target": {"replicas": {"resources": {"GPU": 1}}}}}}, "resources.GPU"),
    ({"gpu": {"serve": {"proxy_location": "Nowhere"}}}, "proxy_location"),
    ({"gpu": {"argz": {}}}, "argz"),
    ({"tpu": {}}, "tpu"),
])
def test_bad_overrides_name_the_overlay_and_field(tmp_path, capsys, edit, words):
    root = _checkout(tmp_path)
    path = root / "k8s" / "serve-overrides.yaml"
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump(k8s._merge(raw, edit)))
    assert k8s.main(["render", "--root", str(root)]) == 2
    assert words in capsys.readouterr().err


def test_render_refuses_an_unknown_overlay():
    with pytest.raises(ValueError, match="overlay must be one of base, gpu, cpu-demo"):
        k8s.render(SERVE_YAML, "tpu")


# ---------------------------------------------------------------------------- what the manifests say


def _quantity(q) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    assert m, q
    return float(m.group(1)) * units.get(m.group(2), 1)


@pytest.mark.parametrize("name", BUILDS)
def test_replicas_land_on_their_own_worker_group_and_fit(builds, name):
    cfg, grps = app_config(builds[name]), groups(builds[name])
    assert set(grps) == {"target", "draft"}
    spare = {}
    for role, rep in (("target", cfg.target.replicas), ("draft", cfg.draft.replicas)):
        assert rep.resources, f"{name}: {role}.replicas.resources must name the group's custom resource"
        declaring = [g for g, spec in grps.items() if set(rep.resources) & set(spec.get("resources", {}))]
        assert declaring == [role], f"{name}: {role} replicas would land on {declaring}"
        g = grps[role]
        per_pod = min(float(g["resources"][r]) // amount for r, amount in rep.resources.items())
        assert per_pod >= 1, f"{name}: one {role} pod cannot hold one replica"
        assert g["maxReplicas"] * per_pod >= rep.max_replicas, \
            f"{name}: {role} maxReplicas {g['maxReplicas']} < Serve's max_replicas {rep.max_replicas}"
        assert g["minReplicas"] <= rep.min_replicas <= rep.max_replicas
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert _quantity(limits.get("nvidia.com/gpu", 0)) >= rep.num_gpus * per_pod
        assert _quantity(limits["cpu"]) >= rep.num_cpus * per_pod
        spare[role] = _quantity(limits["cpu"]) - rep.num_cpus * per_pod
    head = rayservice(builds[name])["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no replica on the head...
    assert max(spare.values()) >= cfg.router.num_cpus, "...so a worker pod must have room for the router"


def test_gpu_builds_ask_for_gpus_and_cpu_demo_for_none(builds):
    for name in ("base", "gpu", "gcs-ft", "models-pvc"):
        cfg = app_config(builds[name])
        for g in groups(builds[name]).values():
            res = g["template"]["spec"]["containers"][0]["resources"]
            assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "1"
            assert g["template"]["spec"]["nodeSelector"] and g["template"]["spec"]["tolerations"]
        for part in (cfg.target, cfg.draft):
            assert part.dtype == "bfloat16" and part.threads is None
        assert cfg.target.replicas.num_gpus == 1 and 0 < cfg.draft.replicas.num_gpus < 1  # drafts share a GPU
        assert cfg.draft.quantize == "none"
    demo = builds["cpu-demo"]
    assert "nvidia.com/gpu" not in yaml.safe_dump(list(demo.values()))
    cfg = app_config(demo)
    assert cfg.target.dtype == cfg.draft.dtype == "float32" and cfg.draft.quantize == "int8"
    for rep in (cfg.target.replicas, cfg.draft.replicas, cfg.router):
        assert rep.num_gpus == 0 and rep.num_cpus != int(rep.num_cpus)  # fractional CPUs
    for g in groups(demo).values():
        assert "nodeSelector" not in g["template"]["spec"] and "tolerations" not in g["template"]["spec"]
    gpu = app_config(builds["gpu"])
    assert gpu.target.replicas.max_replicas > app_config(builds["base"]).target.replicas.max_replicas


@pytest.mark.parametrize("name", BUILDS)
def test_redis_and_the_dashboard_stay_inside_the_cluster(builds, name):
    build = builds[name]
    text = yaml.safe_dump(list(build.values()))
    assert "LoadBalancer" not in text and "NodePort" not in text and "Ingress" not in {d["kind"] for d in build.values()}
    services = [d for d in build.values() if d["kind"] == "Service"]
    rs = rayservice(build)["spec"]
    for svc in services + [rs["serveService"]]:
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", svc["metadata"]["name"]
    head = rs["rayClusterConfig"]["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and head.get("enableIngress") is False


@pytest.mark.parametrize("name", BUILDS)
def test_the_api_needs_a_bearer_token_from_a_secret(builds, name):
    build = builds[name]
    assert app_config(build).auth_token == "env:SPECSERVE_TOKEN"
    rc = rayservice(build)["spec"]["rayClusterConfig"]
    pods = [rc["headGroupSpec"]] + rc["workerGroupSpecs"]
    for pod in pods:  # the router may land on any Ray pod: every one carries the token
        for c in pod["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            ref = env["SPECSERVE_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "specserve-auth", "key": "token"} and "optional" not in ref, c["name"]
    assert "Secret" not in {d["kind"] for d in build.values()}, "never commit a token: create the Secret"


@pytest.mark.parametrize("name", BUILDS)
def test_autoscaling_upgrades_readiness_and_ports(builds, name):
    rs = rayservice(builds[name])["spec"]
    cluster = rs["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert cluster["autoscalerOptions"]["version"] == "v2"
    assert rs["upgradeStrategy"]["type"] == "NewCluster"
    serve = serve_config(builds[name])
    want = {"serve": serve["http_options"]["port"], "serve-grpc": serve["grpc_options"]["port"]}
    assert want["serve-grpc"] == 9000
    for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        (c,) = g["template"]["spec"]["containers"]
        # KubeRay injects its probes (Serve's /-/healthz on the `serve` port for workers) only
        # where the template has none.
        assert "readinessProbe" not in c and "livenessProbe" not in c
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert {k: ports.get(k) for k in want} == want
        assert c["resources"]["requests"] == c["resources"]["limits"]
    svc_ports = {p["name"]: p for p in rs["serveService"]["spec"]["ports"]}
    assert svc_ports["serve-grpc"]["port"] == 9000 and svc_ports["serve-grpc"]["appProtocol"] == "kubernetes.io/h2c"
