"""agentd agent SDK."""
