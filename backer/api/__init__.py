"""The web UI and HTTP API served by a running node (see backer.api.server)."""
