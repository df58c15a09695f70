"""Runs that need no Lightning: one config in, files out (``steer``, ``evaluate``, ``trajectory``).
Runs that train live in ``lens.training``."""
