"""Upstream adapters: one module per provider kind."""
