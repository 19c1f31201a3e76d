"""Serving plane on Ray Serve: the Router, Engine and ExpertGroup deployments, the app builder, the
expert-row and token transports between them, and the metrics they export."""
