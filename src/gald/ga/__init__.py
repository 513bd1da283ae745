"""Global-aggregation (GA) layers, one variant per file, all registered for ``gald.create_ga``."""

from .cgnl import CGNL

__all__ = ["CGNL"]
