"""Ray Serve deployments of specserve (ARCHITECTURE.md, layer 3): `app.build_app(config)`."""
