"""Anthropic Messages: request checks, stream observer, error shapes and plugin views.

The native lane (an Anthropic client on an Anthropic upstream) uses these pieces; the
translations to and from OpenAI chat live in `gateway.translate`.
"""
