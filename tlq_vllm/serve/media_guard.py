"""Refuses media URLs that a production server should not fetch, with a 400 and a clear message.

vLLM fetches any http(s) image URL a client sends (`allowed_media_domains` empty = all allowed) and
answers 500 when the fetch fails; a `file://` URL without `--allowed-local-media-path` is a 500 too.
A server that fetches what clients name is a server-side request forgery risk, so tlq_vllm.serve
adds this ASGI middleware (vLLM's `--middleware`) by default:

- `data:` URLs (inline base64) always pass;
- `http(s)://` URLs pass only when their host is in the allowed domains (preset or flag
  `allowed-media-domains`, which is also handed to vLLM so that vLLM enforces the same list);
- `file://` URLs pass only when the server was given `--allowed-local-media-path` (vLLM then keeps
  them inside that directory).

The launcher passes the policy through the environment (`TLQ_ALLOWED_MEDIA_DOMAINS`, comma
separated; `TLQ_ALLOW_LOCAL_MEDIA=1`), which reaches the API server process it execs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

ENV_DOMAINS = "TLQ_ALLOWED_MEDIA_DOMAINS"
ENV_LOCAL = "TLQ_ALLOW_LOCAL_MEDIA"
URL_KEYS = ("image_url", "video_url", "audio_url", "input_image", "url")


@dataclass(frozen=True)
class MediaPolicy:
    allowed_domains: frozenset[str] = frozenset()
    allow_local: bool = False

    @classmethod
    def from_env(cls, env=os.environ) -> MediaPolicy:
        domains = frozenset(d.strip().lower() for d in env.get(ENV_DOMAINS, "").split(",") if d.strip())
        return cls(domains, env.get(ENV_LOCAL, "") == "1")

    def refusal(self, url: str) -> str | None:
        """Why `url` is refused, or None when it may be loaded."""
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return None
        if scheme in ("http", "https"):
            host = (urlsplit(url).hostname or "").lower()
            if host in self.allowed_domains:
                return None
            allowed = ", ".join(sorted(self.allowed_domains)) or "none"
            return (f"remote media URLs are disabled on this server (host {host!r}; allowed domains: {allowed}); "
                    "send the image inline as a data: URL, or start the server with --allowed-media-domains")
        if scheme == "file":
            if self.allow_local:
                return None
            return ("file:// media URLs are disabled on this server; send the image inline as a data: URL, "
                    "or start the server with --allowed-local-media-path DIR")
        return None  # anything else: vLLM's own validation answers


def media_urls(body) -> list[str]:
    """Every media URL string in a request body (OpenAI chat / responses content parts)."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in URL_KEYS and isinstance(value, str):
                    found.append(value)
                else:  # e.g. image_url: {"url": ...}, found one level down
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(body)
    return found


def first_refusal(raw: bytes, policy: MediaPolicy) -> str | None:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None  # not JSON: vLLM's own parser answers
    for url in media_urls(body):
        if (why := policy.refusal(url)) is not None:
            return why
    return None


class MediaURLGuard:
    """ASGI middleware: reads a POST body, refuses it with 400 if it names a disallowed media URL,
    else replays the body to the app unchanged."""

    def __init__(self, app, policy: MediaPolicy | None = None):
        self.app = app
        self.policy = policy or MediaPolicy.from_env()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        chunks, message = [], {"more_body": True}
        while message.get("more_body", False):
            message = await receive()
            if message["type"] != "http.request":  # client went away
                return
            chunks.append(message.get("body", b""))
        body = b"".join(chunks)
        why = first_refusal(body, self.policy)
        if why is not None:
            await send_error(send, why)
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def send_error(send, message: str, status: int = 400) -> None:
    """An OpenAI-style error body, as vLLM's own 400s have."""
    payload = json.dumps({"error": {"message": message, "type": "BadRequestError", "param": None,
                                    "code": status}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
