"""specserve: a speculative-decoding LLM server (engine, gRPC speculation pipeline, Ray Serve)."""

__version__ = "0.1.0"
