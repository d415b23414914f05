"""Bearer tokens: generated, stored in user-only (0600) files, compared in constant time.

The server keeps only the sha256 digest of its token and compares digests with
`secrets.compare_digest` (equal length, no early exit), so neither the token's length nor its
prefix leaks through timing. Token files are written to a temporary file created 0600 and renamed,
so there is never a moment when the token sits in a readable file.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import secrets
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

#: Environment variable a client reads its token from when none is given.
TOKEN_ENV = "MEDPLIB_SERVER_TOKEN"
SERVER_TOKEN_FILE = "serve-token"


def config_dir() -> Path:
    """The user config folder the widget's settings live in (``NAPARI_MEDPLIB_SETTINGS``'s folder if set)."""
    env = os.environ.get("NAPARI_MEDPLIB_SETTINGS")
    if env:
        return Path(env).parent
    from platformdirs import user_config_dir

    return Path(user_config_dir("napari-medplib", appauthor=False))


def default_server_token_path() -> Path:
    return config_dir() / SERVER_TOKEN_FILE


def new_token() -> str:
    return secrets.token_urlsafe(32)


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def token_matches(presented: str | None, expected_digest: bytes) -> bool:
    """Constant-time check of a presented token against the stored digest."""
    return secrets.compare_digest(digest(presented or ""), expected_digest)


def write_secret(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` readable by the owner only (0600), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # 0600
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return path


def read_secret(path: str | Path) -> str | None:
    """The token in ``path`` (first line, stripped); None when the file is missing or empty."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text.splitlines()[0].strip() if text else None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) only reaches this machine."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_token(host: str, token_file: str | Path | None, no_auth: bool, announce=print) -> str | None:
    """The token the server requires (None: none, loopback only).

    An existing token file is reused; a missing one is created with a new token, which is shown
    once through ``announce``. Without a token the server only binds a loopback address.
    """
    if no_auth:
        if not is_loopback(host):
            raise ValueError(f"--no-auth is only allowed on a loopback address, not on {host}; "
                             "a server on a network interface needs a token (drop --no-auth)")
        return None
    path = Path(token_file) if token_file else default_server_token_path()
    token = read_secret(path)
    if token is None:
        if path.exists() and path.stat().st_size:
            raise ValueError(f"--token-file {path}: cannot read a token from it; delete it to make a new one")
        token = new_token()
        write_secret(path, token)
        announce(f"medplib serve: new access token (shown once; stored in {path}, mode 0600):\n  {token}")
    elif path.stat().st_mode & 0o077:
        announce(f"medplib serve: warning: {path} is readable by other users; run `chmod 600 {path}`")
    return token


def client_token(url: str, token: str | None = None, token_file: str | Path | None = None) -> str | None:
    """The token a client sends: given > ``token_file`` > ``$MEDPLIB_SERVER_TOKEN`` > this user's own
    server token file when the server is on this machine (loopback)."""
    if token:
        return token
    if token_file:
        found = read_secret(token_file)
        if found is None:
            raise ValueError(f"--token-file {token_file}: no token in it; copy the token the server printed")
        return found
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip()
    host = urlsplit(url).hostname or ""
    if is_loopback(host):
        return read_secret(default_server_token_path())
    return None
