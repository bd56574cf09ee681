"""A server-sent events parser (the WHATWG rules Ku's stream uses: id, event, data)."""

from __future__ import annotations

import json
from decimal import Decimal

from ku_client._models import Event


class EventParser:
    def __init__(self) -> None:
        self.last_id: str | None = None
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, line: str) -> Event | None:
        """One line (without its newline); an Event when a blank line ends one."""
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a keep-alive comment
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            self._id = value
        return None

    def _dispatch(self) -> Event | None:
        if not self._data:
            self._event = ""
            return None
        text = "\n".join(self._data)
        try:
            data = json.loads(text, parse_float=Decimal)
        except ValueError:
            data = {"text": text}
        if self._id is not None:
            self.last_id = self._id
        event = Event(id=self._id, event=self._event or "message", data=data)
        self._event, self._data, self._id = "", [], None
        return event
