"""What the content filter did in one request: `FilterStats` under `FILTER`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Final, Literal

from gateway.context import StateKey

FilterAction = Literal["prompt_reject", "prompt_redact", "completion_redact", "completion_stop"]
CONTENT_FILTER: Final = "content_filter"


# ----- per-request records ----------------------------------------------------------------------


@dataclass(slots=True)
class FilterStats:
    """What the content filter did in one request (set in `on_request`, final after the end)."""

    counts: Counter[tuple[str, FilterAction]] = field(default_factory=Counter)
    held_max: int = 0  # most characters held back for one choice at any moment

    def record(self, rule: str, action: FilterAction, count: int = 1) -> None:
        """Count `count` matches of `rule` handled with `action`."""
        self.counts[(rule, action)] += count

    def count(self, rule: str | None = None, action: FilterAction | None = None) -> int:
        """Matches acted on, optionally only for one rule and/or one action."""
        return sum(
            n
            for (r, a), n in self.counts.items()
            if (rule is None or r == rule) and (action is None or a == action)
        )


FILTER: StateKey[FilterStats] = StateKey("content_filter.stats")
_COUNTED: StateKey[FilterStats] = StateKey("content_filter.counted")  # into the metric already
