"""The builder: an `AppConfig` -> the Ray Serve application graph (Router -> Target -> Draft).

`serve run deployments/serve_config.yaml` calls `build_app(args)`; so does `specserve serve`.
"""

from __future__ import annotations

from ray.serve import Application

from .config import AppConfig
from .draft import DraftDeployment
from .router import Router
from .target import TargetDeployment

__all__ = ["build_app", "AppConfig", "GRPC_SERVICER", "GRPC_SERVICERS"]

GRPC_SERVICER = "specserve.v1.serving_pb2_grpc.add_SpecServeServicer_to_server"
HEALTH_SERVICER = "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server"
GRPC_SERVICERS = [GRPC_SERVICER, HEALTH_SERVICER]  # gRPCOptions.grpc_servicer_functions (Router answers both)


def build_app(args: AppConfig) -> Application:
    """Bind the three deployments with their scaling and resources from `args`."""
    cfg = args if isinstance(args, AppConfig) else AppConfig.model_validate(args)
    draft = None
    if cfg.draft is not None:
        draft = DraftDeployment.options(**cfg.draft.replicas.options()).bind(cfg.draft.model_dump())
    target = TargetDeployment.options(**cfg.target.replicas.options()).bind(
        cfg.target.model_dump(), cfg.draft.model_dump() if cfg.draft else None, draft)
    return Router.options(**cfg.router.options()).bind(target, cfg.model_dump())
