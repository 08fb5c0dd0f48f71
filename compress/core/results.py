"""The base of every typed result a stage hands on (profile, prune, quantize, variant, run): a pydantic model
whose JSON form is what the CLI's --json prints, what the stage cache stores and what report.json holds.

Closed by default (an unknown or misspelt key is an error where the result is built, not a silent n/a in a
report); the JSON form leaves out the optional fields a producer never set, so a result dumps exactly the keys
it was given.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

R = TypeVar("R", bound="Result")


class Result(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=(),
                              arbitrary_types_allowed=False)

    def to_json(self) -> dict[str, Any]:
        """The JSON form: field aliases (e.g. "schema", "from"), unset optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)

    @classmethod
    def from_json(cls: type[R], doc: dict[str, Any]) -> R:
        return cls.model_validate(doc)


class OpenResult(Result):
    """For facts that vary by backend, platform or version: the known fields typed, others kept as they are."""

    model_config = ConfigDict(extra="allow")
