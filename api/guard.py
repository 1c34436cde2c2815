"""Who may talk to the server (Host, Origin, API key, CORS) and what every answer carries (security headers,
an access-log line); guard(app) puts it in front of every route."""

import base64
import binascii
import contextlib
import hmac
import ipaddress
import logging
import socket

from flask import Flask, Response, request

from engine.errors import ImagineError
from engine.logs import escaped
from engine.settings import Settings

log = logging.getLogger("imagine")


LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def has_one_owner(settings: Settings) -> bool:
    """Whether everyone who reaches the server is its owner: it holds an API key (the guard lets in only its holders),
    or it listens on loopback only (this machine's users). A keyless server open to other machines serves strangers
    side by side: it lists no job, shows no running picture and pulls no model for them."""
    return bool(settings.api_key) or is_loopback(settings.host)


def host_name(host_header: str) -> str:
    """'localhost:5000' -> 'localhost', '[::1]:5000' -> '::1'."""
    if host_header.startswith("["):
        return host_header[1:].partition("]")[0]
    return host_header.rpartition(":")[0] if ":" in host_header else host_header


def is_name_of_this_machine(host: str) -> bool:
    """An IP address (a DNS-rebinding page has a name, never an address), a local name, or the machine's own name."""
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return True
    name = socket.gethostname().lower()  # no DNS lookup: a request must not wait for one
    names = {name, name.partition(".")[0], f"{name.partition('.')[0]}.local"}
    return host in LOCAL_HOSTS or host.endswith(".localhost") or host in names


def check_who_is_calling(settings: Settings, needs_key: bool = True) -> None:
    """Refuses, before any work, requests this server was not opened up to (docs/server.md, Security)."""
    # DNS rebinding: a web page can make a browser send its requests to 127.0.0.1 under the page's own
    # host name. A server listening on loopback only ever has a local name; anything else is such a page.
    # The raw header: werkzeug's request.host reads a name it finds invalid ("a_b.evil.com") as empty.
    host = host_name(request.headers.get("Host", "").strip().lower())
    if is_loopback(settings.host) and host and host not in LOCAL_HOSTS and not host.endswith(".localhost"):
        raise ImagineError(f"Host {host!r} is not a local name; this server listens on {settings.host} only", 403)
    # Listening on other addresses with no key, the same page could reach it through 127.0.0.1 or the LAN: only
    # its addresses and its machine's names are then names of it. A key is what such a page cannot send.
    if not is_loopback(settings.host) and not settings.api_key and host and not is_name_of_this_machine(host):
        raise ImagineError(
            f"Host {host!r} is not an address or a name of this machine; with no API key only those are accepted "
            "(set IMAGINE_API_KEY to use other names)",
            403,
        )
    # A browser tells every cross-site request's origin; only the origins the user listed may call.
    origin = request.headers.get("Origin")
    if origin is not None and not origin_allowed(settings, origin) and not is_same_origin(origin):
        raise ImagineError(f"origin {origin!r} is not allowed; list it in --cors-origins (IMAGINE_CORS_ORIGINS)", 403)
    # Browsers send no credentials with a CORS preflight, so it is answered before the key is checked.
    if request.method == "OPTIONS" and origin is not None:
        return
    if settings.api_key and needs_key and not has_key(settings):
        raise ImagineError(
            "this server needs an API key: send 'Authorization: Bearer <key>', or HTTP Basic with the key as the "
            "password (any user name)",
            401,
        )


def has_key(settings: Settings) -> bool:
    """Whether the request carries the API key, as a Bearer token or as the password of Basic credentials."""
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # WSGI hands headers over as Latin-1 text: encoding them back gives the bytes the client sent, which
    # for a non-ASCII key are its UTF-8 (curl, browsers) or its Latin-1 (Python's requests): see key_bytes.
    sent = given.strip().encode("latin-1")
    if scheme.lower() == "basic":  # AUTOMATIC1111's clients send --api-auth's user:password: any user, the key
        sent = basic_password(sent)
    elif scheme.lower() != "bearer":
        sent = b""
    # compare_digest takes as long for a near miss as for a wild guess: the key cannot be found byte by byte.
    return bool(sent) and any(hmac.compare_digest(sent, key) for key in key_bytes(settings.api_key))


def key_bytes(key: str) -> list:
    """The bytes a client may send for the key: its UTF-8 (curl, browsers), and its Latin-1 where it has one, which
    Python's requests and http.client send for a str header or auth=(user, key)."""
    forms = [key.encode("utf-8", "surrogateescape")]
    with contextlib.suppress(UnicodeEncodeError):
        forms.append(key.encode("latin-1"))
    return forms


def basic_password(credentials: bytes) -> bytes:
    """The password of HTTP Basic credentials (base64 of user:password), or b"" if they are none."""
    try:
        return base64.b64decode(credentials, validate=True).partition(b":")[2]
    except (binascii.Error, ValueError):
        return b""


def origin_allowed(settings: Settings, origin: str) -> bool:
    return "*" in settings.cors_origins or origin.rstrip("/") in settings.cors_origins


def is_same_origin(origin: str) -> bool:
    """The web page's own requests: a browser sends Origin with a same-origin POST, and it names this server's
    address as the Host header does (already checked to be a local name on a loopback server)."""
    return origin.rstrip("/").lower() == f"{request.scheme}://{request.headers.get('Host', '').strip().lower()}"


# On every answer: only this server's own script and style run, the page talks to this server only, and no
# other site may frame it (clickjacking) or have a browser guess a type from an answer's content.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}


def log_access(response: Response) -> None:
    """One line per request, so that the service's journal tells what happened: who asked for what, the
    status, and for a refusal or failure why. Never the body or the key; every value escaped onto one line."""
    status = response.status_code
    reason = ""
    if status >= 400 and response.is_json:
        error = (response.get_json(silent=True) or {}).get("error", "")
        message = error.get("message", "") if isinstance(error, dict) else error  # OpenAI's shape on /v1/
        reason = f' "{escaped(str(message)[:300])}"'
    path = escaped(request.path[:300])
    level = logging.INFO if status < 400 else logging.WARNING
    log.log(level, '%s "%s %s" %d%s', request.remote_addr, request.method, path, status, reason)


# The page and its files hold no secret: a browser must load them to ask for the key at all. /health answers a
# load balancer's check, which sends no key, with {"status": "ok"} alone (see native.health_route).
KEY_FREE_ENDPOINTS = ("native.index_route", "native.web_file_route", "native.health_route")


def guard(app: Flask, settings: Settings) -> None:
    """Checks every request before its route runs, and marks every answer, the errors' included."""

    @app.before_request
    def who_is_calling():
        check_who_is_calling(settings, needs_key=request.endpoint not in KEY_FREE_ENDPOINTS)
        if request.method == "OPTIONS" and request.headers.get("Origin") is not None:
            return preflight_answer()

    @app.after_request
    def mark_answer(response):
        origin = request.headers.get("Origin")
        if origin is not None and origin_allowed(settings, origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
        response.headers.update(SECURITY_HEADERS)
        log_access(response)
        return response


def preflight_answer() -> Response:
    return Response(
        status=204,
        headers={
            "Access-Control-Allow-Methods": "GET, POST, DELETE",  # DELETE cancels a job
            "Access-Control-Allow-Headers": "Content-Type, Authorization, Last-Event-ID",
            "Access-Control-Max-Age": "600",
        },
    )
