"""Helpers for testing Sluice and its plugins: fake upstreams, context builders."""
