"""agentd bus: the ZeroMQ broker, its wire envelope and the client."""
