"""Serving without Ray: the public API's validation (`api`), a target replica's work (`replica`)
and the router's calls over a session store (`router`). `deployments/` wraps them in Ray Serve."""
