"""What a web browser may ask of a server on this machine: the refusals serve and board share.

A page on any web site can make the user's browser send requests to ``127.0.0.1``. Two ways in are shut:

- **Cross-site requests.** A POST with a ``text/plain`` body needs no permission from the server (no CORS
  preflight): the browser sends it and only hides the answer, so a page could run completions, load adapters or,
  through the board's playground, use the serve key the board holds. Browsers mark such requests with an ``Origin``
  (or ``Sec-Fetch-Site: cross-site``) header; a request whose origin is not the server's own is refused, except a
  top-level navigation (following a link to the board), whose answer only the user sees. Clients that are not
  browsers (curl, the openai package) send neither header and are not affected.
- **DNS rebinding.** A page whose own host name is made to resolve to 127.0.0.1 is same-origin with the server in
  the browser's eyes and may read the answers (run reports, recipes, completions). Such a request still names the
  attacker's host in its ``Host`` header: a server without an API key (which then listens on this machine only)
  answers only requests addressed to a loopback name (as Ollama and Jupyter do).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from urllib.parse import urlsplit


def is_loopback(host: str | None) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def refusal(headers: Mapping[str, str], api_key: str | None) -> str | None:
    """Why a request with these (lower-case) headers is refused, or None to serve it."""
    host = headers.get("host", "")
    origin = headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != host:
        return f"a request from another web origin ({origin}) is refused"
    if headers.get("sec-fetch-site") == "cross-site" and headers.get("sec-fetch-mode") != "navigate":
        return "a cross-site request from a web page is refused"  # following a link to the board is not one
    if not api_key and not is_loopback(urlsplit("//" + host).hostname):
        return f"Host {host!r} is not a name of this machine (a server without an API key answers local names only)"
    return None
