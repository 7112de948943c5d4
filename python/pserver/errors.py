"""The exceptions pserver raises.

Every error of the cluster or the client is a :class:`Error`; the classes
below say which kind it is, and the message is the one the server (or the
worker library) gave. ``code`` is the server's error code (``"WrongWidth"``,
``"BadKeys"``, ...) when a server refused the request, else ``None``.
Errors that are also a wrong argument (``NotSorted``, ``WrongWidth``,
``NotFinite``, ``InvalidRequest``) are ``ValueError`` too, and so on, so
code that catches the built-in classes keeps working.
"""

from __future__ import annotations


class Error(Exception):
    """Any error of pserver. ``code``: the server's error code, or None."""

    code: "str | None" = None


class RemoteError(Error):
    """A server or the manager refused the request for another reason."""


class UnknownTable(Error, KeyError):
    """No table of that name exists in the cluster (create it first)."""

    def __str__(self) -> str:
        # KeyError's str() would quote the message.
        return str(self.args[0]) if self.args else ""


class WrongWidth(Error, ValueError):
    """Values whose shape does not match the keys and the table's dim."""


class NotSorted(Error, ValueError):
    """Keys that are not sorted and unique (pass ``sort=True``)."""


class NotFinite(Error, ValueError):
    """A pushed value is NaN or infinite."""


class InvalidRequest(Error, ValueError):
    """A request the worker library refused before sending it."""


class Duplicate(Error):
    """This worker already pushed at this clock to the keys' range: a
    worker pushes once per clock (call :meth:`Client.next_clock` between
    pushes)."""


class LimitExceeded(Error):
    """A configured limit of the cluster (keys per request, frame size)."""


class ConnectError(Error, ConnectionError):
    """A node could not be reached, or the connection closed."""


class AuthError(ConnectError):
    """The cluster secret was refused, missing, or could not be read."""


class TlsError(ConnectError):
    """TLS could not be set up, or the peer's certificate was refused."""


class Timeout(Error, TimeoutError):
    """A request did not complete within the client's timeout."""


class Unavailable(Error):
    """No live server holds part of the keys."""


class ClientClosed(Error):
    """The client was closed."""


class DataError(Error):
    """A data file or its schema could not be read (a missing file, a
    schema that does not fit the header, corrupt compression):
    :func:`pserver.data.read_fields`."""


__all__ = [
    "Error",
    "RemoteError",
    "UnknownTable",
    "WrongWidth",
    "NotSorted",
    "NotFinite",
    "InvalidRequest",
    "Duplicate",
    "LimitExceeded",
    "ConnectError",
    "AuthError",
    "TlsError",
    "Timeout",
    "Unavailable",
    "ClientClosed",
    "DataError",
]
