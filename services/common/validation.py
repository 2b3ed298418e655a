"""Field validators shared by the services' schemas."""
from __future__ import annotations

from marshmallow import ValidationError, validate


class WholeMatch(validate.Regexp):
    """validate.Regexp over the whole value: with `re.match`, a final `$` lets a trailing newline through."""

    def __call__(self, value):
        if self.regex.fullmatch(value) is None:
            raise ValidationError(self._format_error(value))
        return value
