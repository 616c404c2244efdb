"""blip2-search: application wiring shared by every component (settings, CLI)."""

__version__ = "0.1.0"
