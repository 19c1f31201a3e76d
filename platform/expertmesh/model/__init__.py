"""The model family: config, layers, routing, experts, loader."""
