"""The base of every options model (prune, quantize, run, search): typed and checked where it is built, with
one set of defaults that the command line reads (`QuantOptions.default("method")` in a click option), so no
default is written twice.

Pydantic checks types and refuses unknown options; each model's own `check()` (or its stage's) refuses values
out of range with a one-line message naming the flag the user typed.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, validate_assignment=True)

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of option NAME, as the library applies it (and click shows it)."""
        return cls.model_fields[name].get_default(call_default_factory=True)
