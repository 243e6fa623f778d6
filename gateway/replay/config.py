"""The `replay:` config block (the store) and a route's `replay:` opt-in."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class ReplayConfig(BaseModel):
    """Where replayed answers are kept: this replica's memory, or Redis shared by replicas.

    Routes opt in with `replay: true` (or `replay: {pacing: ..., ...}`); see docs/replay.md.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    redis_url: SecretStr | None = Field(
        None, description="redis://host:6379/0: share answers between replicas (else memory)"
    )
    key_prefix: str = Field("sluice:replay:", min_length=1, description="Redis key prefix")
    ttl_seconds: float = Field(3600.0, gt=0, description="how long an answer is replayed")
    max_entries: int = Field(1000, ge=1, description="memory store: most answers kept (LRU)")
    max_bytes: int = Field(
        64 << 20, ge=1024, description="memory store: most bytes kept (least recently used go)"
    )
    max_entry_bytes: int = Field(
        1 << 20, ge=256, description="an answer larger than this is not kept (routes may lower)"
    )
    max_gap_seconds: float = Field(
        2.0, ge=0, description="`pacing: original`: the longest pause replayed between events"
    )


class RouteReplay(BaseModel):
    """A route's replay settings (`replay: true` is all defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pacing: Literal["instant", "original"] = Field(
        "instant", description="instant: as fast as the client reads; original: recorded gaps"
    )
    max_entry_bytes: int | None = Field(
        None, ge=256, description="this route's bound on a kept answer (default: the block's)"
    )
    shared: bool = Field(False, description="one team's answer may be replayed to another")
