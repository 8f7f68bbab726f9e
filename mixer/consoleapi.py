"""The console's JSON API described as OpenAPI 3.1 (served at ``/api/v1/openapi.json``).

Written by hand next to the routes (``mixer.console.ROUTES``): aiohttp makes no schema,
and a test checks that every route is described here and nothing else is.
"""

from __future__ import annotations

from typing import Any, Final


def _q(name: str, doc: str, kind: str = "string") -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": doc,
            "schema": {"type": kind}}


def _p(name: str, doc: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": doc,
            "schema": {"type": "string"}}


def _op(summary: str, params: list[dict[str, Any]] | None = None, *,
        body: str | None = None, admin: bool = False,
        stream: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary, "parameters": params or [],
        "responses": {"200": {"description": "OK", "content": {
            "text/event-stream" if stream else "application/json": {}}},
            "401": {"description": "not logged in (no session cookie or bearer token)"}}}
    if admin:
        op["responses"]["403"] = {"description": "needs the admin role"}
    if body:
        op["requestBody"] = {"required": True, "description": body,
                             "content": {"application/json": {}}}
    return op


RACK: Final = _p("rack", "the rack id")
OPENAPI: Final[dict[str, Any]] = {
    "openapi": "3.1.0",
    "info": {"title": "fluxrig Mixer console API", "version": "1",
             "description": "Every route needs a session (POST /login) or "
                            "`Authorization: Bearer fxc_...` (mixer console token NAME). "
                            "Card numbers never appear: tokens and masked PANs only."},
    "components": {"securitySchemes": {
        "session": {"type": "apiKey", "in": "cookie", "name": "fx_session"},
        "token": {"type": "http", "scheme": "bearer"}}},
    "security": [{"session": []}, {"token": []}],
    "paths": {
        "/login": {
            "get": {"summary": "the login page (HTML)", "security": [],
                    "responses": {"200": {"description": "HTML"}}},
            "post": {"summary": "log in: {user, password} as JSON or a form; sets the "
                                "session cookie (a form is redirected to /)", "security": [],
                     "responses": {"200": {"description": "{user, role}"},
                                   "303": {"description": "form login: to / or back"},
                                   "401": {"description": "wrong user or password"},
                                   "429": {"description": "too many failed logins"}}}},
        "/api/v1/logout": {"post": _op("end the session (clears the cookie)")},
        "/api/v1/me": {"get": _op("who is logged in: {user, role}")},
        "/api/v1/fleet": {"get": _op(
            "every rack: state, labels, version, rig hash, frames/s, p99, errors, CPU, RSS, "
            "backlog to the hub, snapshot age, a minute of frames/s (spark)",
            [_q("label", "KEY=VALUE, repeatable: only racks with every label")])},
        "/api/v1/fleet/events": {"get": _op(
            "server-sent events: `fleet` {version, racks: changed rows} once a second when "
            "something changed; `reset` when the client fell behind (reload the fleet)",
            stream=True)},
        "/api/v1/racks/{rack}": {"get": _op(
            "one rack: its row, latest snapshot (processes, counters, ring fill), recent "
            "errors (counter increases), config revisions with the last diff and state",
            [RACK])},
        "/api/v1/racks/{rack}/config": {"get": _op(
            "one config revision's text and its diff against the one before",
            [RACK, _q("rev", "the revision", "integer")])},
        "/api/v1/racks/{rack}/deploy": {"post": _op(
            "deploy a rig ({text}) or roll back to a revision ({rev}); checked as the "
            "rack's rig first", [RACK], body="{text: RIG YAML} or {rev: N}", admin=True)},
        "/api/v1/transactions": {"get": _op(
            "search the audit trail's transactions, newest first",
            [_q("terminal", "DE41"), _q("stan", "DE11"), _q("token", "card token"),
             _q("rack", "rack id"), _q("de39", "response code"),
             _q("from", "YYYY-MM-DD, inclusive"), _q("to", "YYYY-MM-DD, inclusive"),
             _q("amount_min", "minor units", "integer"),
             _q("amount_max", "minor units", "integer"),
             _q("limit", "at most 500 (default 100)", "integer")])},
        "/api/v1/transactions/{event_id}": {"get": _op(
            "one event: its row, decoded body (masked), and its chain's verification",
            [_p("event_id", "the event's id (hex)")])},
        "/api/v1/reports/daily": {"get": _op(
            "counts, amounts, p50/p99 latency by rack, DE39 and issuer for a day",
            [_q("date", "YYYY-MM-DD (default: today, UTC)")])},
        "/api/v1/uns": {"get": _op(
            "every tag's newest sample across the racks' UNS copies at the hub")},
        "/api/v1/uns/history": {"get": _op(
            "a tag's samples since a time, oldest first (at most 2,000)",
            [_q("rack", "rack id"), _q("path", "the tag's UNS path"),
             _q("since", "epoch seconds (default: an hour ago)", "number")])},
        "/api/v1/openapi.json": {"get": _op("this document")},
    },
}

__all__ = ["OPENAPI"]
