"""Model monitoring: traffic capture, feedback and live accuracy, drift (docs/monitoring.md)."""

from .hub import Monitor, ModelMonitor

__all__ = ["Monitor", "ModelMonitor"]
