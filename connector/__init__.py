"""Coherent warehouse connector: signed webhooks into SQL tables you can query."""

__version__ = "0.1.0"
