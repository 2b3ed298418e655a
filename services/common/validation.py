"""Field validators shared by the services' schemas."""
from __future__ import annotations

import re
import uuid

from marshmallow import ValidationError, validate

# A model named as `name:version` (each part safe for a runtime: no spaces, slashes, colons).
NAME_VERSION = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}:[a-z0-9][a-z0-9._-]{0,62}$")


class WholeMatch(validate.Regexp):
    """validate.Regexp over the whole value: with `re.match`, a final `$` lets a trailing newline through."""

    def __call__(self, value):
        if self.regex.fullmatch(value) is None:
            raise ValidationError(self._format_error(value))
        return value


def model_ref(value: str) -> None:
    """A model named by its id or as `name:version` (an exclude entry, say)."""
    if NAME_VERSION.fullmatch(value):
        return
    try:
        uuid.UUID(value)
    except ValueError:
        raise ValidationError("Must be a model id or name:version.") from None
