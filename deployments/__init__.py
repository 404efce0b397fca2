"""Ray Serve deployments of specserve (docs/architecture.md, "Layers"): `app.build_app(config)`."""
