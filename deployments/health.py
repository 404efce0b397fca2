"""`grpc.health.v1.Health` on the public gRPC port, answered by the Router deployment.

Serve's gRPC proxy routes `/grpc.health.v1.Health/Check` and `/Watch` to the ingress
deployment's methods of those names (`add_HealthServicer_to_server` is in the app's
`grpc_servicer_functions`, deployments/app.py). SERVING means: the target deployment (and the
draft deployment, when the app has one) has at least one running replica, as Serve's controller
reports it. The service name is "" (the whole server) or "specserve.v1.SpecServe"; any other
is NOT_FOUND, as the health protocol says. Reflection (`grpc.reflection.v1alpha`) is Serve's own
(`gRPCOptions.enable_reflection`, on by default): it lists specserve.v1.SpecServe and
grpc.health.v1.Health.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2
from ray import serve

log = logging.getLogger("ray.serve")

SERVICES = ("", "specserve.v1.SpecServe")
WATCH_POLL_S = 1.0  # how often Watch asks the controller again
_SERVING, _NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def replicas_up(app: str, deployments: tuple[str, ...]) -> tuple[bool, str]:
    """Whether every deployment named has a RUNNING replica (and, if not, which has none)."""
    try:
        status = serve.status().applications[app].deployments
    except Exception as e:  # the controller is unreachable: nothing can be routed
        return False, f"serve status failed: {type(e).__name__}"
    for name in deployments:
        d = status.get(name)
        running = d.replica_states.get("RUNNING", 0) if d is not None else 0
        if not running:
            return False, f"{name} has no running replica"
    return True, ""


class HealthRoutes:
    """gRPC methods of the Router deployment (it sets `needed`: the deployments that must be up)."""

    needed: tuple[str, ...] = ("TargetDeployment",)

    async def _health(self) -> int:
        app = serve.get_replica_context().app_name
        up, why = await asyncio.get_running_loop().run_in_executor(None, replicas_up, app, self.needed)
        if not up:
            log.info("health: NOT_SERVING (%s)", why)
        return _SERVING if up else _NOT_SERVING

    @staticmethod
    def _known(request, grpc_context) -> bool:
        if request.service in SERVICES:
            return True
        if grpc_context is not None:
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"service {request.service!r} is unknown: ask for '' or 'specserve.v1.SpecServe'")
        return False

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context=None):
        if not self._known(request, grpc_context):
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=await self._health())

    async def Watch(self, request: health_pb2.HealthCheckRequest, grpc_context=None):
        """The status now, then each change (polled every WATCH_POLL_S) until the client leaves."""
        if not self._known(request, grpc_context):
            return
        last = None
        while True:
            now = await self._health()
            if now != last:
                yield health_pb2.HealthCheckResponse(status=now)
                last = now
            await asyncio.sleep(WATCH_POLL_S)
