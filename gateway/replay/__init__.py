"""The replay cache: deterministic answers kept as the bytes the client got, served again.

See `gateway.replay.cache` (the request-level hook), `gateway.replay.key` (what is
cacheable, and the key), `gateway.replay.store` (memory and Redis) and docs/replay.md.
"""
