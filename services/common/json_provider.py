"""Flask's JSON provider on orjson: the same output as Flask's own, several times faster."""
from __future__ import annotations

from typing import Any

import orjson
from flask import Response
from flask.json.provider import DefaultJSONProvider

from services.common import fast_json

# As Flask's: sorted keys; dates, Decimals and the like handed to Flask's own `default` (HTTP dates, strings).
OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME


class OrjsonProvider(DefaultJSONProvider):
    def dumps(self, obj: Any, **kwargs: Any) -> str:
        if kwargs:  # options orjson does not have (indent=4, say)
            return super().dumps(obj, **kwargs)
        return self._dumps(obj).decode()

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return fast_json.loads(s)

    def response(self, *args: Any, **kwargs: Any) -> Response:
        obj = self._prepare_response_obj(args, kwargs)
        return self._app.response_class(self._dumps(obj) + b"\n", mimetype=self.mimetype)

    def _dumps(self, obj: Any) -> bytes:
        try:
            return orjson.dumps(obj, default=self.default, option=OPTIONS)
        except orjson.JSONEncodeError:  # an integer beyond 64 bits, say: Flask's own way
            return super().dumps(obj).encode()
