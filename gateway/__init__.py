"""Sluice: a streaming gateway for LLM traffic."""

__version__ = "0.1.0"
