"""Serving plane: expert-group transport, and (next) the Ray Serve deployments."""
