"""gitea-flux-bridge: authenticated Gitea -> Flux push ingest and Flux -> Gitea commit statuses."""

__version__ = "0.1.0"
