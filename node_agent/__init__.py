"""The node agent: the daemon on every edge device that serves local models."""
