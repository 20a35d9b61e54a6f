"""The aiohttp service that composes engines and front ends, and the CLI."""

__version__ = "0.1.0"
