"""The `responses:` config block: where the gateway keeps Responses it answered itself."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator


class ResponsesConfig(BaseModel):
    """Conversation state for Responses served through a translated lane (chat upstreams),
    so `previous_response_id`, `GET` and `DELETE /v1/responses/{id}` work whatever the
    upstream. A request with `store: false` is never kept."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    store: Literal["memory", "redis"] = Field(
        "memory", description="memory: this replica only; redis: shared by every replica"
    )
    redis_url: SecretStr | None = Field(
        None, description="redis://host:6379/0, required with `store: redis`"
    )
    key_prefix: str = Field("sluice:responses:", min_length=1, description="Redis key prefix")
    retention_seconds: float = Field(
        86400.0, gt=0, description="how long a stored response can be continued or read"
    )
    max_entries: int = Field(10000, ge=1, description="memory store: most responses kept")
    max_bytes: int = Field(
        64 << 20, ge=1024, description="memory store: most bytes kept (oldest evicted first)"
    )
    max_entry_bytes: int = Field(
        4 << 20,
        ge=1024,
        description="a response whose conversation is larger is not stored (follow-ups 404)",
    )

    @model_validator(mode="after")
    def _redis_needs_url(self) -> Self:
        if self.store == "redis" and self.redis_url is None:
            raise ValueError("`store: redis` needs `redis_url`")
        return self
