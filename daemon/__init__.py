"""agentd daemon: config, supervision tree, process runtime, control."""

__version__ = "0.1.0"
