"""The Kubernetes manifests (k8s/): they build, validate, and say what specserve needs.

No cluster and no network: every manifest of every kustomize build (base, overlays gpu and
cpu-demo) is checked against the Kubernetes schemas of one pinned version (the kubernetes-validate
package ships them) or, for the RayService, against the KubeRay CRD schema committed under
k8s/schema/ (made strict: an unknown field fails, as with `kubectl apply --validate=strict`);
its serveConfigV2 against Ray's ServeDeploySchema and specserve's AppConfig.

Builds: `_kustomize` below is a small kustomize subset (resources, JSON 6902 `patches` with a
target, `images`) that fails on anything else in a kustomization.yaml. Where `kubectl` is on the
PATH (its built-in kustomize), every build is also made by it and must be identical, so the
subset cannot drift from the real thing unnoticed. Each overlay must then equal base plus exactly
its intended changes (`INTENDED`).
"""

from __future__ import annotations

import copy
import fnmatch
import re
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
KUBERNETES_VERSION = "1.34"  # the Kubernetes API the standard kinds are validated against
CRD_SCHEMA = K8S / "schema" / "kuberay-v1.7.0-rayservice-v1.openapi.yaml"
KUBERAY_VERSION = "v1.7.0"
BUILDS = {"base": K8S / "base", "gpu": K8S / "overlays" / "gpu", "cpu-demo": K8S / "overlays" / "cpu-demo"}
RAY = "ray.io/v1", "RayService"

# What each overlay may change in the base build, and must change (every pattern matches at least
# one changed leaf). Paths are kind/name/path/to/leaf; `*` also matches across `/`.
_RS = "RayService/specserve/spec"
_WG = _RS + "/rayClusterConfig/workerGroupSpecs/*/template/spec"
_HEAD = _RS + "/rayClusterConfig/headGroupSpec/template/spec"
INTENDED = {
    "gpu": [_RS + "/serveConfigV2", _HEAD + "/containers/0/image", _WG + "/containers/0/image",
            _RS + "/rayClusterConfig/workerGroupSpecs/*/maxReplicas"],
    "cpu-demo": [_RS + "/serveConfigV2", _HEAD + "/containers/0/image", _WG + "/containers/0/image",
                 _HEAD + "/containers/0/resources/*", _WG + "/containers/0/resources/*",
                 _WG + "/nodeSelector*", _WG + "/tolerations*"],
}


# ---------------------------------------------------------------------------- a kustomize subset


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), f"JSON pointer {path!r} must start with /"
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _json6902(doc: dict, ops: list[dict], where: str) -> None:
    """RFC 6902 add / remove / replace / test, in place."""
    for op in ops:
        *parents, last = _pointer(op["path"])
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if isinstance(node, list):
            key = len(node) if last == "-" else int(last)
        else:
            key = last
        kind = op["op"]
        if kind == "test":
            assert node[key] == op["value"], f"{where}: test failed at {op['path']}: {node[key]!r} != {op['value']!r}"
        elif kind == "remove":
            assert isinstance(node, list) or key in node, f"{where}: remove of missing {op['path']}"
            del node[key]
        elif kind == "replace":
            assert isinstance(node, list) or key in node, f"{where}: replace of missing {op['path']}"
            node[key] = copy.deepcopy(op["value"])
        elif kind == "add":
            if isinstance(node, list):
                node.insert(key, copy.deepcopy(op["value"]))
            else:
                node[key] = copy.deepcopy(op["value"])
        else:
            raise AssertionError(f"{where}: op {kind!r} is not in this test's kustomize subset")


def _targets(doc: dict, target: dict) -> bool:
    assert set(target) <= {"group", "version", "kind", "name"}, f"target keys {sorted(target)}"
    group, _, version = doc["apiVersion"].rpartition("/")
    want = {"group": group, "version": version, "kind": doc["kind"], "name": doc["metadata"]["name"]}
    return all(want[k] == v for k, v in target.items())


def _split_image(image: str) -> tuple[str, str | None]:
    if "@" in image:
        return image.split("@", 1)[0], None
    name, sep, tag = image.rpartition(":")
    return (name, tag) if sep and "/" not in tag else (image, None)


def _set_images(node, rule: dict) -> None:
    """kustomize's image transformer: every containers[]/initContainers[] image named rule['name']."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    name, tag = _split_image(c.get("image", ""))
                    if name == rule["name"]:
                        tag = rule.get("newTag", tag)
                        c["image"] = rule.get("newName", name) + (f":{tag}" if tag else "")
            _set_images(value, rule)
    elif isinstance(node, list):
        for x in node:
            _set_images(x, rule)


def _kustomize(d: Path) -> list[dict]:
    k = yaml.safe_load((d / "kustomization.yaml").read_text())
    unknown = set(k) - {"apiVersion", "kind", "resources", "patches", "images"}
    assert not unknown, f"{d}/kustomization.yaml: {sorted(unknown)} is outside this test's kustomize subset"
    docs: list[dict] = []
    for r in k.get("resources", []):
        p = d / r
        docs += _kustomize(p) if p.is_dir() else [x for x in yaml.safe_load_all(p.read_text()) if x]
    for patch in k.get("patches", []):
        assert set(patch) == {"path", "target"}, f"{d}: only patches with path + target: {patch}"
        ops = yaml.safe_load((d / patch["path"]).read_text())
        assert isinstance(ops, list), f"{d / patch['path']}: only JSON 6902 patches (a list of ops)"
        hits = [x for x in docs if _targets(x, patch["target"])]
        assert hits, f"{d}: patch {patch['path']} matches no resource"
        for x in hits:
            _json6902(x, ops, str(d / patch["path"]))
    for rule in k.get("images", []):
        assert set(rule) <= {"name", "newName", "newTag"}, f"{d}: images entry {rule}"
        _set_images(docs, rule)
    return docs


def _key(doc: dict) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def _by_key(docs: list[dict]) -> dict[str, dict]:
    out = {_key(d): d for d in docs}
    assert len(out) == len(docs), "two resources with one kind/name"
    return out


@pytest.fixture(scope="module")
def builds() -> dict[str, dict[str, dict]]:
    return {name: _by_key(_kustomize(d)) for name, d in BUILDS.items()}


def _rayservice(build: dict[str, dict]) -> dict:
    return build["RayService/specserve"]


def _serve_config(build) -> dict:
    return yaml.safe_load(_rayservice(build)["spec"]["serveConfigV2"])


def _app_config(build) -> AppConfig:
    (app,) = [a for a in _serve_config(build)["applications"] if a["import_path"] == k8s.APP_IMPORT]
    return AppConfig.model_validate(app["args"])


def _groups(build) -> dict[str, dict]:
    return {g["groupName"]: g for g in _rayservice(build)["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


# ---------------------------------------------------------------------------- builds


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its kustomize) is not on PATH")
@pytest.mark.parametrize("name", BUILDS)
def test_the_subset_builds_what_real_kustomize_builds(builds, name):
    out = subprocess.run(["kubectl", "kustomize", str(BUILDS[name])], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert _by_key([d for d in yaml.safe_load_all(out.stdout) if d]) == builds[name]


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
def test_overlays_change_base_only_where_intended(builds, overlay):
    base, over = builds["base"], builds[overlay]
    assert set(over) == set(base), "an overlay adds or drops resources"
    changed = set().union(*({f"{key}/{p}" for p in _changed(base[key], over[key])} for key in base))
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
    with pytest.raises(AssertionError, match="test failed"):
        _kustomize(tmp_path / "k8s" / "overlays" / "gpu")


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
    return jsonschema.Draft7Validator(_strict(yaml.safe_load(text)))


@pytest.mark.parametrize("name", BUILDS)
def test_standard_kinds_validate_against_the_kubernetes_schemas(builds, name):
    import kubernetes_validate

    standard = [d for d in builds[name].values() if (d["apiVersion"], d["kind"]) != RAY]
    assert {d["kind"] for d in standard} >= {"Service", "StatefulSet", "NetworkPolicy"}
    for doc in standard:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {_key(doc)} at {'/'.join(map(str, e.path))}: {e.message}")


@pytest.mark.parametrize("name", BUILDS)
def test_rayservice_validates_against_the_kuberay_crd(builds, rayservice_validator, name):
    rs = _rayservice(builds[name])
    assert (rs["apiVersion"], rs["kind"]) == RAY
    errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in rayservice_validator.iter_errors(rs)]
    assert not errors, f"{name}: {errors}"
    assert set(rs["metadata"]) <= {"name", "labels", "annotations"}


def test_the_crd_check_is_strict(builds, rayservice_validator):
    rs = copy.deepcopy(_rayservice(builds["base"]))
    rs["spec"]["rayClusterConfig"]["enableInTreeAutoScaling"] = True  # a typo the API server would drop
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "4"
    messages = " ".join(e.message for e in rayservice_validator.iter_errors(rs))
    assert "enableInTreeAutoScaling" in messages and "'4' is not of type 'integer'" in messages


@pytest.mark.parametrize("name", BUILDS)
def test_serve_config_v2_is_the_rendered_serve_config(builds, name):
    from ray.serve.schema import ServeDeploySchema

    from deployments.app import build_app

    text = _rayservice(builds[name])["spec"]["serveConfigV2"]
    assert text == k8s.render(SERVE_YAML, name)
    raw = yaml.safe_load(text)
    ServeDeploySchema.model_validate(raw)
    cfg = _app_config(builds[name])
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
        cfg = _app_config(_by_key(_kustomize(root / d.relative_to(ROOT))))
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
    cfg, groups = _app_config(builds[name]), _groups(builds[name])
    assert set(groups) == {"target", "draft"}
    spare = {}
    for role, rep in (("target", cfg.target.replicas), ("draft", cfg.draft.replicas)):
        assert rep.resources, f"{name}: {role}.replicas.resources must name the group's custom resource"
        declaring = [g for g, spec in groups.items() if set(rep.resources) & set(spec.get("resources", {}))]
        assert declaring == [role], f"{name}: {role} replicas would land on {declaring}"
        g = groups[role]
        per_pod = min(float(g["resources"][r]) // amount for r, amount in rep.resources.items())
        assert per_pod >= 1, f"{name}: one {role} pod cannot hold one replica"
        assert g["maxReplicas"] * per_pod >= rep.max_replicas, \
            f"{name}: {role} maxReplicas {g['maxReplicas']} < Serve's max_replicas {rep.max_replicas}"
        assert g["minReplicas"] <= rep.min_replicas <= rep.max_replicas
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert _quantity(limits.get("nvidia.com/gpu", 0)) >= rep.num_gpus * per_pod
        assert _quantity(limits["cpu"]) >= rep.num_cpus * per_pod
        spare[role] = _quantity(limits["cpu"]) - rep.num_cpus * per_pod
    head = _rayservice(builds[name])["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no replica on the head...
    assert max(spare.values()) >= cfg.router.num_cpus, "...so a worker pod must have room for the router"


def test_gpu_builds_ask_for_gpus_and_cpu_demo_for_none(builds):
    for name in ("base", "gpu"):
        cfg = _app_config(builds[name])
        for g in _groups(builds[name]).values():
            res = g["template"]["spec"]["containers"][0]["resources"]
            assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "1"
            assert g["template"]["spec"]["nodeSelector"] and g["template"]["spec"]["tolerations"]
        for part in (cfg.target, cfg.draft):
            assert part.dtype == "bfloat16" and part.threads is None and part.replicas.num_gpus == 1
        assert cfg.draft.quantize == "none"
    demo = builds["cpu-demo"]
    assert "nvidia.com/gpu" not in yaml.safe_dump(list(demo.values()))
    cfg = _app_config(demo)
    assert cfg.target.dtype == cfg.draft.dtype == "float32" and cfg.draft.quantize == "int8"
    for rep in (cfg.target.replicas, cfg.draft.replicas, cfg.router):
        assert rep.num_gpus == 0 and rep.num_cpus != int(rep.num_cpus)  # fractional CPUs
    for g in _groups(demo).values():
        assert "nodeSelector" not in g["template"]["spec"] and "tolerations" not in g["template"]["spec"]
    gpu = _app_config(builds["gpu"])
    assert gpu.target.replicas.max_replicas > _app_config(builds["base"]).target.replicas.max_replicas


@pytest.mark.parametrize("name", BUILDS)
def test_redis_and_the_dashboard_stay_inside_the_cluster(builds, name):
    build = builds[name]
    text = yaml.safe_dump(list(build.values()))
    assert "LoadBalancer" not in text and "NodePort" not in text and "Ingress" not in {d["kind"] for d in build.values()}
    services = [d for d in build.values() if d["kind"] == "Service"]
    rs = _rayservice(build)["spec"]
    for svc in services + [rs["serveService"]]:
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", svc["metadata"]["name"]
    head = rs["rayClusterConfig"]["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and head.get("enableIngress") is False


@pytest.mark.parametrize("name", BUILDS)
def test_the_api_needs_a_bearer_token_from_a_secret(builds, name):
    build = builds[name]
    assert _app_config(build).auth_token == "env:SPECSERVE_TOKEN"
    rc = _rayservice(build)["spec"]["rayClusterConfig"]
    pods = [rc["headGroupSpec"]] + rc["workerGroupSpecs"]
    for pod in pods:  # the router may land on any Ray pod: every one carries the token
        for c in pod["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            ref = env["SPECSERVE_TOKEN"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "specserve-auth", "key": "token"} and "optional" not in ref, c["name"]
    assert "Secret" not in {d["kind"] for d in build.values()}, "never commit a token: create the Secret"


@pytest.mark.parametrize("name", BUILDS)
def test_redis_persists_and_the_app_points_at_it(builds, name):
    build = builds[name]
    sts = build["StatefulSet/specserve-redis"]
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    assert c["args"][c["args"].index("--appendonly") + 1] == "yes"
    assert c["args"][c["args"].index("--dir") + 1] == "/data"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in c["volumeMounts"]
    assert build[f"Service/{sts['spec']['serviceName']}"]["spec"]["clusterIP"] == "None"
    url = _app_config(build).redis_url
    m = re.fullmatch(r"redis://([a-z0-9-]+):(\d+)/\d+", url or "")
    assert m, url
    svc = build[f"Service/{m.group(1)}"]["spec"]
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert svc["selector"].items() <= pod_labels.items() and int(m.group(2)) in [p["port"] for p in svc["ports"]]
    # the NetworkPolicy admits every Ray pod
    policy = build["NetworkPolicy/specserve-redis"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    admitted = policy["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    cluster = _rayservice(build)["spec"]["rayClusterConfig"]
    for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert admitted.items() <= g["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize("name", BUILDS)
def test_autoscaling_upgrades_readiness_and_ports(builds, name):
    rs = _rayservice(builds[name])["spec"]
    cluster = rs["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True and cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert rs["upgradeStrategy"]["type"] == "NewCluster"
    serve = _serve_config(builds[name])
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


def test_image_ray_and_package_versions_agree(builds):
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    tags = {"base": "gpu", "gpu": "gpu", "cpu-demo": "cpu"}
    for name, build in builds.items():
        cluster = _rayservice(build)["spec"]["rayClusterConfig"]
        ray_version = cluster["rayVersion"]
        assert f"ARG RAY_VERSION={ray_version}\n" in dockerfile
        assert "ARG RAY_IMAGE=rayproject/ray:${RAY_VERSION}-py311-gpu" in dockerfile
        assert f"rayproject/ray:{ray_version}-py311 " in dockerfile  # the CPU build line
        for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            image = g["template"]["spec"]["containers"][0]["image"]
            assert image.endswith(f"specserve:{version}-{tags[name]}"), (name, image)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not {"specserve", "deployments", "pyproject.toml", "README.md"} & set(ignored)
