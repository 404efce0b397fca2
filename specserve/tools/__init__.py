"""Tools around the engine and the server: `bench`, `bench_server`, `loadtest`, `simulate`, `k8s`."""
