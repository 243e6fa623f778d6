"""Per-request replay state other modules read without importing the cache."""

from __future__ import annotations

from gateway.context import StateKey

REPLAY: StateKey[str] = StateKey("replay")
"""What the replay cache did with the request: hit, miss or bypass (unset: not cacheable)."""

ENDED_EARLY: StateKey[bool] = StateKey("replay.ended_early")
"""Set by the stream relay when a plugin ended the stream (`EndStream`): never kept."""
