"""Errors of the remote session: one line naming the server URL and what to do.

They are ValueErrors (the CLI prints them as one line, the widget as a notification), and the
connection ones are ConnectionErrors too, so callers that catch either see them.
"""

from __future__ import annotations


class RemoteError(ValueError):
    """The MedPLIB server could not serve a request; the message names the URL and the fix."""


class ServerUnavailableError(RemoteError, ConnectionError):
    """The server cannot be reached, or the connection was lost mid-answer."""


class ServerTimeoutError(RemoteError, TimeoutError):
    """The server did not answer in time."""


class ServerAuthError(RemoteError, PermissionError):
    """The server refused the token (401)."""


class ServerBusyError(RemoteError):
    """The server's queue is full or its rate limit was reached (503 / 429)."""
