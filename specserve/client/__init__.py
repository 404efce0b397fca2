"""Client code of the public gRPC API: `Client` (Python) and `run_chat` (`specserve chat`)."""

from .client import Client, ClientError

__all__ = ["Client", "ClientError"]
