"""Who can reach what in k8s/, and where the secrets come from; models and placement of the pods.

- Ray's token authentication is on, its token a Secret nobody commits;
- the NetworkPolicies, evaluated here as the Kubernetes API defines them, keep every Ray port
  (GCS, dashboard, client, raylets) to the RayCluster's own pods, open the dashboard to the
  KubeRay operator alone and the Serve ports to everyone; Redis admits only the Ray pods;
- Redis has a password from a Secret, on a current 7.4 patch release, with its append-only file,
  and the router's redis_url reads that password from its environment (`${NAME}`);
- every worker pod prepares the models its replicas load into a volume at $SPECSERVE_HOME;
- drafts take half a GPU and prefer the nodes of the target pods.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time

import pytest
from k8s_helpers import BUILDS, app_config, build_all, cluster, groups, ray_pods

from deployments.config import AppConfig

REDIS_IMAGE = "redis:7.4.11"
KUBERAY_NS = {"kubernetes.io/metadata.name": "kuberay-system"}
OPERATOR = {"app.kubernetes.io/name": "kuberay-operator"}
RAY_PORTS = {6379, 8265, 10001, 52365, 8076, 12345}  # GCS, dashboard, client, agent, object manager, a worker
SERVE_PORTS = {8000, 9000}


@pytest.fixture(scope="module")
def builds():
    return build_all()


# ---------------------------------------------------------------------------- NetworkPolicy semantics


def _selects(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels, matchExpressions In/NotIn/Exists/DoesNotExist) against labels."""
    assert set(selector) <= {"matchLabels", "matchExpressions"}, f"unknown selector fields {selector}"
    if not (selector.get("matchLabels") or {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions") or []:
        have = e["key"] in labels
        ok = {"In": have and labels.get(e["key"]) in e.get("values", []),
              "NotIn": not have or labels[e["key"]] not in e.get("values", []),
              "Exists": have, "DoesNotExist": not have}[e["operator"]]
        if not ok:
            return False
    return True


def _peer_admitted(peer: dict, pod: dict, ns: dict, same_ns: bool) -> bool:
    if "ipBlock" in peer:
        return False  # pods are not matched by ipBlock rules here
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], ns):
            return False
    elif not same_ns:
        return False
    return _selects(peer.get("podSelector") or {}, pod)


def reachable(build: dict, target: dict, peer: dict, peer_ns: dict, port: int) -> bool:
    """Can a pod labelled `peer` in a namespace labelled `peer_ns` open `port` on a pod labelled `target`
    (both in the app's namespace, 'specserve', when peer_ns says so)?"""
    same_ns = peer_ns.get("kubernetes.io/metadata.name") == "specserve"
    policies = [d["spec"] for d in build.values() if d["kind"] == "NetworkPolicy"
                and "Ingress" in d["spec"].get("policyTypes", ["Ingress"]) and _selects(d["spec"]["podSelector"], target)]
    if not policies:
        return True  # no policy selects the pod: all ingress allowed
    for p in policies:
        for rule in p.get("ingress") or []:
            ports = rule.get("ports")
            if ports and not any(q.get("port") == port for q in ports):
                continue
            peers = rule.get("from")
            if not peers or any(_peer_admitted(x, peer, peer_ns, same_ns) for x in peers):
                return True
    return False


def _pod_labels(group: dict) -> dict:
    """A Ray pod's labels: its template's plus those KubeRay adds to every Ray pod."""
    return {**group["template"]["metadata"]["labels"], "ray.io/is-ray-node": "yes", "ray.io/cluster": "specserve-x1"}


APP_NS = {"kubernetes.io/metadata.name": "specserve"}


@pytest.mark.parametrize("name", BUILDS)
def test_ray_ports_are_for_the_clusters_own_pods_and_serve_ports_for_all(builds, name):
    build = builds[name]
    pods = [_pod_labels(g) for g in ray_pods(build)]
    redis = build["StatefulSet/specserve-redis"]["spec"]["template"]["metadata"]["labels"]
    strangers = [({}, APP_NS), ({"app": "web"}, {"kubernetes.io/metadata.name": "other"}), (redis, APP_NS),
                 ({"app.kubernetes.io/part-of": "specserve"}, APP_NS), (OPERATOR, APP_NS)]
    for target in pods:
        for peer in pods:
            assert all(reachable(build, target, peer, APP_NS, p) for p in RAY_PORTS | SERVE_PORTS)
        for peer, ns in strangers:
            assert not any(reachable(build, target, peer, ns, p) for p in RAY_PORTS), (target, peer, ns)
            assert all(reachable(build, target, peer, ns, p) for p in SERVE_PORTS)
        # the operator deploys serveConfigV2 through the dashboard, and reaches nothing else of Ray
        assert reachable(build, target, OPERATOR, KUBERAY_NS, 8265)
        assert not any(reachable(build, target, OPERATOR, KUBERAY_NS, p) for p in RAY_PORTS - {8265})
    # Redis: the Ray pods (the router, and the GCS with fault tolerance) and nobody else
    for peer in pods:
        assert reachable(build, redis, peer, APP_NS, 6379)
    for peer, ns in strangers + [(OPERATOR, KUBERAY_NS)]:
        assert not reachable(build, redis, peer, ns, 6379), peer


def test_the_policy_check_can_fail(builds):
    build = {k: v for k, v in builds["base"].items() if k != "NetworkPolicy/specserve-ray"}
    head = _pod_labels(cluster(build)["headGroupSpec"])
    assert reachable(build, head, {}, {"kubernetes.io/metadata.name": "other"}, 8265)


@pytest.mark.parametrize("name", BUILDS)
def test_ray_token_authentication_is_on(builds, name):
    c = cluster(builds[name])
    assert c["authOptions"] == {"mode": "token", "secretName": "specserve-ray-auth"}
    for g in ray_pods(builds[name]):
        for container in g["template"]["spec"]["containers"]:  # KubeRay sets them from the Secret
            assert not {"RAY_AUTH_TOKEN", "RAY_AUTH_MODE"} & {e["name"] for e in container.get("env", [])}


# ---------------------------------------------------------------------------- Redis


@pytest.mark.parametrize("name", BUILDS)
def test_redis_has_a_password_from_a_secret_and_persists(builds, name):
    build = builds[name]
    sts = build["StatefulSet/specserve-redis"]
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    assert c["image"] == REDIS_IMAGE
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]}
    assert env == {"REDIS_PASSWORD": {"name": "specserve-redis", "key": "password"},
                   "REDISCLI_AUTH": {"name": "specserve-redis", "key": "password"}}
    words = shlex.split(c["args"][0].split("<<")[0].replace("\\\n", " "))
    assert words[:3] == ["exec", "redis-server", "-"], "the config (the password) comes on stdin"
    assert words[words.index("--appendonly") + 1] == "yes" and words[words.index("--dir") + 1] == "/data"
    assert 'requirepass "$REDIS_PASSWORD"' in c["args"][0]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in c["volumeMounts"]
    assert build[f"Service/{sts['spec']['serviceName']}"]["spec"]["clusterIP"] == "None"
    assert "Secret" not in {d["kind"] for d in build.values()}, "never commit a password: create the Secret"


@pytest.mark.parametrize("name", BUILDS)
def test_the_router_reads_the_redis_password_from_its_environment(builds, name, monkeypatch):
    build = builds[name]
    cfg = app_config(build)
    assert cfg.redis_url == "redis://:${SPECSERVE_REDIS_PASSWORD}@specserve-redis:6379/0"
    svc = build["Service/specserve-redis"]["spec"]
    assert 6379 in [p["port"] for p in svc["ports"]]
    for g in ray_pods(build):  # the router may land on any Ray pod
        env = {e["name"]: e for e in g["template"]["spec"]["containers"][0]["env"]}
        assert env["SPECSERVE_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "specserve-redis", "key": "password"}
    monkeypatch.setenv("SPECSERVE_REDIS_PASSWORD", "s3cr/t@x")
    assert cfg.resolved_redis_url() == "redis://:s3cr%2Ft%40x@specserve-redis:6379/0"


def test_redis_url_placeholders_come_from_the_environment(monkeypatch):
    from redis.connection import parse_url

    monkeypatch.setenv("PW", "p@ss:w/rd")
    url = AppConfig(redis_url="redis://:${PW}@h:6379/0").resolved_redis_url()
    assert parse_url(url)["password"] == "p@ss:w/rd" and parse_url(url)["host"] == "h"
    monkeypatch.delenv("PW")
    with pytest.raises(ValueError, match=r"redis_url names \$\{PW\} but \$PW is not set"):
        AppConfig(redis_url="redis://:${PW}@h:6379/0").resolved_redis_url()
    assert AppConfig(redis_url="redis://h:1/0").resolved_redis_url() == "redis://h:1/0"
    monkeypatch.setenv("REDIS_URL", "redis://other:2/0")
    assert AppConfig().resolved_redis_url() == "redis://other:2/0"


def test_the_redis_command_starts_a_server_that_wants_the_password(builds, tmp_path):
    """The StatefulSet's own shell command, run against the redis-server on this machine."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("redis-server is not on PATH: install it (apt-get install redis-server)")
    (c,) = builds["base"]["StatefulSet/specserve-redis"]["spec"]["template"]["spec"]["containers"]
    port = 26000 + (time.time_ns() // 1000) % 3000
    script = c["args"][0].replace("--dir /data", f"--dir {tmp_path} --port {port} --bind 127.0.0.1")
    env = {"PATH": "/usr/bin:/bin", "REDIS_PASSWORD": "0a1b2c3d"}
    server = subprocess.Popen([*c["command"], script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        cli = ["redis-cli", "-p", str(port)]
        for _ in range(50):
            if subprocess.run(cli + ["ping"], capture_output=True, text=True).stdout.strip():
                break
            time.sleep(0.1)
        assert "NOAUTH" in subprocess.run(cli + ["ping"], capture_output=True, text=True).stdout
        authed = {"PATH": "/usr/bin:/bin", "REDISCLI_AUTH": "0a1b2c3d"}
        assert subprocess.run(cli + ["ping"], capture_output=True, text=True, env=authed).stdout.strip() == "PONG"
        out = subprocess.run(cli + ["config", "get", "appendonly"], capture_output=True, text=True, env=authed).stdout
        assert out.split() == ["appendonly", "yes"]
        with open(f"/proc/{server.pid}/cmdline", "rb") as f:
            assert b"0a1b2c3d" not in f.read(), "the password shows in the process list"
    finally:
        server.terminate()
        server.wait(10)


# ---------------------------------------------------------------------------- models and placement


def _prepares(cmd: list[str]) -> set[str]:
    """The models `specserve models prepare ...` prepares."""
    from specserve.models import KNOWN_MODELS, PAIRS

    assert cmd[:3] == ["specserve", "models", "prepare"], cmd
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16"
    pair = cmd[cmd.index("--pair") + 1] if "--pair" in cmd else "qwen2.5-coder"
    prepared = set(PAIRS[pair]) if pair in PAIRS else {pair}
    assert prepared <= set(KNOWN_MODELS)
    return prepared


@pytest.mark.parametrize("name", BUILDS)
def test_every_worker_gets_the_models_its_replicas_load(builds, name):
    """Prepared by its init container into its own volume, or by a Job into a shared claim that its
    init container waits for: either way at $SPECSERVE_HOME, where the engine looks."""
    build = builds[name]
    cfg = app_config(build)
    loads = {"target": {cfg.target.model} | ({cfg.draft.model} if cfg.target.local_draft else set()),
             "draft": {cfg.draft.model}}
    jobs = [d["spec"]["template"]["spec"] for d in build.values() if d["kind"] == "Job"]
    for group, g in groups(build).items():
        spec = g["template"]["spec"]
        (init,) = spec["initContainers"]
        (ray,) = spec["containers"]
        home = {e["name"]: e.get("value") for e in ray["env"]}["SPECSERVE_HOME"]
        assert {e["name"]: e.get("value") for e in init["env"]}["SPECSERVE_HOME"] == home
        (mount,) = [m for m in ray["volumeMounts"] if m["mountPath"] == home]
        assert {"name": mount["name"], "mountPath": home} in [{k: m[k] for k in ("name", "mountPath")}
                                                               for m in init["volumeMounts"]]
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        if "emptyDir" in volume:
            assert loads[group] <= _prepares(init["command"]), group
            continue
        claim = volume["persistentVolumeClaim"]["claimName"]
        assert volume["persistentVolumeClaim"]["readOnly"] and mount["readOnly"]
        (job,) = [j for j in jobs if any((v.get("persistentVolumeClaim") or {}).get("claimName") == claim
                                         for v in j["volumes"])]
        (prep,) = job["containers"]
        assert {e["name"]: e.get("value") for e in prep["env"]}["SPECSERVE_HOME"] == home
        assert loads[group] <= _prepares(prep["command"]), group
        for model in loads[group]:  # the init container waits for each one
            assert f"$SPECSERVE_HOME/models/{model}-bfloat16/specserve.json" in init["command"][-1], model
        assert build[f"PersistentVolumeClaim/{claim}"]["spec"]["accessModes"] == ["ReadWriteMany"]
    for g in groups(build).values():  # the init containers fit in what the pod asks for
        init, ray = g["template"]["spec"]["initContainers"][0], g["template"]["spec"]["containers"][0]
        for side in ("requests", "limits"):
            for r in ("cpu", "memory"):
                assert _qty(init["resources"][side][r]) <= _qty(ray["resources"][side][r]), r


def _qty(q) -> float:
    units = {"m": 1e-3, "Mi": 2**20, "Gi": 2**30}
    for u, f in units.items():
        if str(q).endswith(u):
            return float(str(q)[: -len(u)]) * f
    return float(q)


@pytest.mark.parametrize("name", ["base", "gpu", "gcs-ft", "models-pvc"])
def test_drafts_share_a_gpu_and_prefer_the_targets_nodes(builds, name):
    cfg, g = app_config(builds[name]), groups(builds[name])
    assert cfg.draft.replicas.num_gpus == 0.5
    per_pod = float(g["draft"]["resources"]["specserve_draft"]) / cfg.draft.replicas.resources["specserve_draft"]
    assert per_pod * cfg.draft.replicas.num_gpus <= float(
        g["draft"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    (pref,) = g["draft"]["template"]["spec"]["affinity"]["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    term = pref["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    target_labels = _pod_labels(g["target"])
    assert _selects(term["labelSelector"], target_labels)
    assert not _selects(term["labelSelector"], _pod_labels(g["draft"]))



# ---------------------------------------------------------------------------- k8s/README.md


def _secret_refs(node, out: set) -> set:
    """Every (Secret, key) a manifest reads: secretKeyRef anywhere, and Ray's token Secret."""
    if isinstance(node, dict):
        if "secretKeyRef" in node:
            out.add((node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]))
        if (node.get("authOptions") or {}).get("secretName"):
            out.add((node["authOptions"]["secretName"], "auth_token"))  # the key KubeRay reads
        for v in node.values():
            _secret_refs(v, out)
    elif isinstance(node, list):
        for v in node:
            _secret_refs(v, out)
    return out


def test_the_readme_commands_match_the_manifests(builds):
    import re

    from k8s_helpers import K8S

    text = (K8S / "README.md").read_text()
    created = set(re.findall(r"kubectl create secret generic (\S+) -n specserve --from-literal=(\w+)=", text))
    read = set().union(*(_secret_refs(list(builds[n].values()), set()) for n in BUILDS))
    assert created == read, f"the README creates {sorted(created)}, the pods read {sorted(read)}"
    for path in re.findall(r"-k (k8s/[\w/-]+)", text):
        assert (K8S.parent / path / "kustomization.yaml").is_file(), path
    assert "kubectl wait -n specserve --for=condition=Ready rayservice/specserve" in text
    assert not re.search(r"(?<!kubectl )\bkustomize (edit|build)\b", text), "kustomize is kubectl's: no separate binary"
    for cmd in ("chat", "bench-server", "loadtest"):
        (line,) = [ln for ln in text.splitlines() if ln.startswith(f"specserve {cmd} ")]
        assert '--token "$SPECSERVE_TOKEN"' in line, line
    assert "70B" in text and "tensor parallelism" in text
