"""`gitea-flux-bridge doctor`: what would fail silently, found before a push does."""
