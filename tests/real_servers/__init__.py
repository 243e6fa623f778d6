"""Opt-in tests against real OpenAI-compatible servers (see tools/llama-tests.sh)."""
