"""One configuration: the pydantic AppConfig, the Serve YAML that carries it, and the builder."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from deployments.config import AppConfig, load_serve_config

ROOT = Path(__file__).resolve().parents[1]
SERVE_YAML = ROOT / "deployments" / "serve_config.yaml"


def _models(m: type[BaseModel], seen=None):
    seen = seen if seen is not None else set()
    if m in seen:
        return seen
    seen.add(m)
    for f in m.model_fields.values():
        ann = f.annotation
        for t in (ann, *getattr(ann, "__args__", ())):
            if isinstance(t, type) and issubclass(t, BaseModel):
                _models(t, seen)
    return seen


def test_every_config_field_is_documented():
    undocumented = [f"{m.__name__}.{name}" for m in _models(AppConfig)
                    for name, f in m.model_fields.items() if not (f.description or "").strip()]
    assert not undocumented, f"add a docstring under each field: {undocumented}"


def test_serve_yaml_parses_with_rays_schema_and_the_builder_accepts_it():
    from ray.serve.schema import ServeDeploySchema

    from deployments.app import GRPC_SERVICERS, build_app

    raw = yaml.safe_load(SERVE_YAML.read_text())
    schema = ServeDeploySchema.model_validate(raw)
    app = schema.applications[0]
    assert app.import_path == "deployments.app:build_app"
    assert set(GRPC_SERVICERS) <= set(raw["grpc_options"]["grpc_servicer_functions"])  # SpecServe and Health
    cfg, _ = load_serve_config(str(SERVE_YAML))
    assert cfg == AppConfig.model_validate(app.args)
    assert build_app(app.args) is not None and build_app(cfg) is not None
    assert cfg.modes == ("ar", "sd", "ssd") and cfg.default_mode == "ssd"
    opts = cfg.target.replicas.options()
    assert opts["autoscaling_config"]["max_replicas"] == 2 and 0 < opts["ray_actor_options"]["num_cpus"] < 1


@pytest.mark.parametrize("args,words", [
    ({"target": {"modle": "x"}}, "modle"),
    ({"target": {"replicas": {"min_replicas": 3, "max_replicas": 1}}}, "min_replicas"),
    ({"draft": None, "limits": {"default_mode": "ssd"}}, "no draft"),
    ({"target": {"local_draft": False}, "limits": {"default_mode": "sd"}}, "local_draft"),
    ({"limits": {"k_max": 0}}, "k_max"),
    ({"target": {"device": "gpu"}}, "device"),
])
def test_bad_configs_name_the_field(args, words):
    with pytest.raises(ValidationError, match=words):
        AppConfig.model_validate(args)


def test_without_a_draft_only_ar_is_served():
    cfg = AppConfig.model_validate({"draft": None})
    assert cfg.modes == ("ar",) and cfg.default_mode == "ar"


def test_serve_cli_rejects_a_bad_config_file(tmp_path, capsys):
    from specserve.cli import main

    bad = tmp_path / "bad.yaml"
    raw = yaml.safe_load(SERVE_YAML.read_text())
    raw["applications"][0]["args"]["target"]["replicas"]["num_cpus"] = -1
    bad.write_text(yaml.safe_dump(raw))
    assert main(["serve", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "--config" in err and "num_cpus" in err
    assert main(["serve", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_config_offers_the_dtypes_the_engine_and_the_cli_take():
    """pydantic needs a Literal; it must name exactly engine.defaults.DTYPES plus auto, as the CLI's flags do."""
    from typing import get_args

    from deployments.config import DraftConfig, TargetConfig
    from specserve.cli.common import DTYPE_CHOICES
    from specserve.engine.defaults import DTYPES

    for cfg in (TargetConfig, DraftConfig):
        assert set(get_args(cfg.model_fields["dtype"].annotation)) == {*DTYPES, "auto"} == set(DTYPE_CHOICES), cfg
