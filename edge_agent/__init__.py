"""edge-agent: patch-wise anomaly inspection for one station of a production line."""

__version__ = "0.1.0"
