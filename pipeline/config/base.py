"""What every config section shares: models that refuse unknown keys, and the error that names the key."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key."""


class StrictModel(BaseModel):
    """A config section: an unknown key is an error naming it, not a silently ignored typo."""

    model_config = ConfigDict(extra="forbid")


def check_json_schema(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """A JSON Schema the `jsonschema` library accepts (ValueError, which names the key, otherwise)."""
    if value is not None:
        import jsonschema

        try:
            jsonschema.validators.validator_for(value).check_schema(value)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"invalid JSON Schema: {exc.message}") from None
    return value
