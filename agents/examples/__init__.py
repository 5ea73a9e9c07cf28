"""Example agents bundled with agentd."""
