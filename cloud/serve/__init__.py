"""pice's cloud tier on Ray Serve: a gateway deployment (the FastAPI app), cloud-model
deployments (one engine or backend per replica) and an edge registry actor that lets an agent
connected to any gateway replica serve points for requests entering through any other.
`pice serve --ray` runs it; `serve run k8s/ray/serve-config.yaml` and KubeRay deploy it."""
