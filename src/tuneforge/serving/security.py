"""Who may call what, and how much: API keys, the admin key, the adapter root, the request body size.

* User keys (``Authorization: Bearer KEY``) guard the ``/v1`` endpoints; with none configured they are open
  (loopback use), and ``tuneforge serve`` refuses to listen on a non-loopback address without keys.
* The admin key guards load/unload; a user key gets 403, a missing or wrong key 401. Without an admin key
  the admin endpoints are off (403).
* Adapters loaded at run time must live under the adapter root: the path is resolved (``..`` and symbolic
  links followed) before the check, and so is every file and folder inside it (a weights file that is a link
  to a file outside the root is refused, naming it); a path with a NUL byte, or one the file system refuses
  (too long, ...), is a 400 naming ``lora_path``.
* :class:`BodyLimit` (ASGI middleware) answers 413 to a body over the limit without reading the rest.
"""

from __future__ import annotations

import hmac
import json
import os
from pathlib import Path

from tuneforge.serving.protocol import APIError, error_body


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str, keys: list[str]) -> bool:
    found = False
    for key in keys:                               # compare with every key: time does not tell which matched
        found |= hmac.compare_digest(token.encode(), key.encode())
    return found


def check_user(header: str | None, user_keys: list[str], admin_key: str | None) -> None:
    """Raise 401 unless the header carries a user key (or the admin key); open when no user keys exist."""
    if not user_keys:
        return
    token = bearer_token(header)
    if token is None:
        raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'", code="invalid_api_key")
    if not (_matches(token, user_keys) or (admin_key is not None and _matches(token, [admin_key]))):
        raise APIError(401, "invalid API key", code="invalid_api_key")


def check_admin(header: str | None, user_keys: list[str], admin_key: str | None) -> None:
    """Raise 403 for a user key or when admin endpoints are off, 401 for a missing or unknown key."""
    if admin_key is None:
        raise APIError(403, "admin endpoints are disabled: start the server with --admin-key", code="admin_disabled")
    token = bearer_token(header)
    if token is None:
        raise APIError(401, "missing admin key: send the header 'Authorization: Bearer <admin key>'",
                       code="invalid_api_key")
    if _matches(token, [admin_key]):
        return
    if _matches(token, user_keys):
        raise APIError(403, "this key may not manage adapters: use the admin key", code="insufficient_permissions")
    raise APIError(401, "invalid API key", code="invalid_api_key")


def adapter_path_under(root: Path | None, path: str) -> Path:
    """``path`` (absolute, or relative to ``root``) resolved, if it lies under ``root``; else 403/400."""
    if root is None:
        raise APIError(403, "loading adapters at run time needs an adapter root: start the server with --adapter-root",
                       param="lora_path", code="adapter_root_unset")
    if "\x00" in path:
        raise APIError(400, "lora_path: holds a NUL byte; give the adapter's folder, relative to the adapter root",
                       param="lora_path", code="invalid_value")
    try:
        root = root.resolve()
        resolved = (root / path).resolve()
        if not _under(resolved, root):
            raise APIError(403, f"lora_path {path!r} is outside the adapter root", param="lora_path",
                           code="path_outside_root")
        if resolved.is_dir():
            _check_tree_under(resolved, root, path)
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise APIError(400, f"lora_path: cannot be used as a folder ({reason}); give the adapter's folder, "
                       "relative to the adapter root", param="lora_path", code="invalid_value") from None
    return resolved


MAX_ADAPTER_ENTRIES = 10_000       # files and folders an adapter folder may hold (the check reads them all)


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _check_tree_under(folder: Path, root: Path, given: str) -> None:
    """403 naming the first file or folder inside ``folder`` that resolves (through a link) outside ``root``."""
    seen = 0
    for here, dirs, files in os.walk(folder, followlinks=False):
        for name in [*dirs, *files]:
            seen += 1
            if seen > MAX_ADAPTER_ENTRIES:
                raise APIError(400, f"lora_path {given!r}: over {MAX_ADAPTER_ENTRIES} files; an adapter folder "
                               "holds a few", param="lora_path", code="invalid_value")
            entry = Path(here) / name
            if entry.is_symlink() and not _under(entry.resolve(), root):
                raise APIError(403, f"lora_path {given!r}: {entry.relative_to(folder)} is a link to a file outside "
                               "the adapter root; copy the file into the folder instead", param="lora_path",
                               code="path_outside_root")


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is answered 413 (by its Content-Length, or while read)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _reply(send, 413, f"request body over {self.max_bytes} bytes", "body")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await _reply(send, 413, f"request body over {self.max_bytes} bytes", "body")
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _reply(send, status: int, message: str, param: str | None) -> None:
    payload = json.dumps(error_body(message, "invalid_request_error", param, "request_too_large")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})
