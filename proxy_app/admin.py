"""The LiteLLM-compatible key admin API: /key/* and /spend/logs, master key only.

Routes, fields and answers follow LiteLLM's (its ``litellm.proxy.client`` key client works
against them, tests/test_litellm_client.py); the rules are in proxy_app/keys.py and the
database work in proxy_app/key_store.py.

- Only the master key (the carriers of proxy_app/auth.py, compared in constant time) may
  call it. No key or a wrong one is 401; a working virtual key is 403, except for
  ``GET /key/info`` about itself; with no master key configured every call is 403.
- A plaintext key is in the answer of /key/generate and /key/regenerate only: never in a
  log line, another answer or an error ("key not found" does not repeat what was sent).
- The database unreachable is a 503 in the JSON envelope, never a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time

from flask import Response
from flask import request
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import ClientDisconnected

from proxy_app import key_store
from proxy_app import keys
from proxy_app import metrics
from proxy_app.auth import key_carriers
from proxy_app.auth import presented_key
from proxy_app.body import close_after_response
from proxy_app.errors import Refusal
from proxy_app.errors import error_response
from proxy_app.key_gate import STORE_DOWN
from proxy_app.key_rules import UNKNOWN_KEY
from proxy_app.keys import BadField
from proxy_app.keys import token_for
from proxy_app.keys import token_of
from proxy_app.usage import MASTER

log = logging.getLogger("proxy_app")

NO_MASTER_KEY = "The admin API needs general_settings.master_key to be set."
NO_KEY = "Authentication Error, no key was presented."
NOT_MASTER = "Only the master key may call the admin API."
KEY_NOT_FOUND = "key not found"
# An admin body is a few fields; anything larger is not one.
MAX_BODY = 1 << 20
# /key/list: LiteLLM's default page size, and the largest page served.
DEFAULT_PAGE_SIZE = 10
MAX_PAGE_SIZE = 100
MAX_LOG_ROWS = 1000
# The /key/list query parameters LiteLLM's client sends; include_team_keys means nothing
# without teams, the others filter on the inert fields stored with the key.
LIST_PARAMS = {"page", "size", "key_alias", "key_hash", "return_full_object", "include_team_keys", "user_id", "team_id", "organization_id"}
SPEND_PARAMS = {"api_key", "key_alias", "start_date", "end_date", "limit", "page"}


def refuse(environ, status: int, message: str, kind: str, headers: list[tuple[str, str]] = ()) -> Response:
    """An error answer in the envelope, the unread request body settled first.

    Read through ``request.stream``, which stops at the body's end under any WSGI server
    (the raw ``wsgi.input`` of werkzeug's server would block past it); a body larger than
    an admin call ever is, is not read: the connection closes after the answer.
    """
    response = error_response(status, message, kind, headers)
    remaining = MAX_BODY
    try:
        while remaining > 0:
            chunk = request.stream.read(min(65536, remaining))
            if not chunk:
                return response
            remaining -= len(chunk)
    except (OSError, ClientDisconnected):  # the caller went away, or sent a broken body: nothing to keep the connection for
        pass
    close_after_response(environ, response)
    return response


def json_response(value, status: int = 200) -> Response:
    return Response(json.dumps(value, separators=(",", ":")), status=status, content_type="application/json")


class Admin:
    def __init__(self, settings, engine):
        self.engine = engine
        self.master_key = settings.master_key.encode() if settings.master_key else None

    # --- the guard around every route ---------------------------------------------------------

    def route(self, view, *, self_info: bool = False):
        """``view(caller, ...)`` behind the master-key check, its failures in the envelope."""

        @functools.wraps(view)
        def run(**kwargs):
            environ = request.environ
            try:
                caller = self.caller(environ)
                if caller != MASTER and not self_info:
                    raise Refusal(403, NOT_MASTER, "auth_error")
                return view(caller, **kwargs)
            except Refusal as exc:
                return refuse(environ, exc.status, exc.message, exc.kind)
            except BadField as exc:
                return refuse(environ, exc.status, exc.message, "invalid_request_error" if exc.status == 400 else "request_too_large")
            except key_store.KeyNotFound:
                return refuse(environ, 404, KEY_NOT_FOUND, "not_found_error")
            except key_store.KeyConflict as exc:
                return refuse(environ, 409, str(exc), "conflict_error")
            except SQLAlchemyError as exc:
                metrics.STORE_ERRORS.labels("database", "admin").inc()
                # The class only: a statement's text or parameters are not for the log.
                log.warning("admin: %s %s: the database failed (%s)", request.method, request.url_rule, type(exc).__name__)
                return refuse(environ, 503, STORE_DOWN, "service_unavailable", [("Retry-After", "5")])

        return run

    def caller(self, environ):
        """MASTER, or the KeyRecord of a working virtual key; else raises Refusal."""
        if self.master_key is None:
            raise Refusal(403, NO_MASTER_KEY, "auth_error")
        if key_carriers(environ, self.master_key, None):
            return MASTER
        presented, _carrier = presented_key(environ, None)
        if not presented:
            raise Refusal(401, NO_KEY, "auth_error")
        now = time.time()
        # Hashing what was presented: a stored token presented as a key matches nothing.
        record = key_store.find_key(self.engine, token_of(presented), now)
        if record is None or record.blocked or (record.expires is not None and record.expires <= now):
            raise Refusal(401, UNKNOWN_KEY, "auth_error")
        return (record, token_of(presented))

    # --- bodies and query strings ----------------------------------------------------------------

    @staticmethod
    def body(table) -> dict:
        return keys.validate(Admin.json_body({}), table)

    @staticmethod
    def json_body(empty):
        """The request body parsed as JSON; ``empty`` when there is none."""
        try:
            raw = request.stream.read(MAX_BODY + 1)
        except ClientDisconnected:
            raise BadField("The request body ended early.") from None
        if len(raw) > MAX_BODY:
            raise BadField("The request body is too large.", 413)
        if not raw.strip():
            return empty
        try:
            return json.loads(raw)
        except ValueError:  # UnicodeDecodeError is one
            raise BadField("The request body is not valid JSON.") from None

    @staticmethod
    def params(allowed: set[str]) -> dict[str, str]:
        for name in request.args:
            if name not in allowed:
                raise BadField(f"unknown query parameter {name}")
        return {name: request.args[name] for name in request.args}

    @staticmethod
    def number_param(params: dict, name: str, default: int, maximum: int) -> int:
        text = params.get(name)
        if text is None or text == "":
            return default
        if not text.isdigit() or not 1 <= int(text) <= maximum:
            raise BadField(f"{name} must be an integer from 1 to {maximum}")
        return int(text)

    # --- routes ------------------------------------------------------------------------------------

    def generate(self, _caller):
        fields = self.body(keys.GENERATE_FIELDS)
        now = time.time()
        key = keys.custom_key(fields["key"]) if fields.get("key") is not None else keys.new_key()
        changes = keys.changes_of(fields, now, update=False)
        record = key_store.create_key(self.engine, token_of(key), keys.key_name(key), changes.columns, changes.extra, now)
        log.info("admin: key %s generated (alias %s)", record.token, record.key_alias)
        return json_response({"key": key, **keys.describe(record)})

    def update(self, _caller):
        fields = self.body(keys.UPDATE_FIELDS)
        now = time.time()
        token = self.named_key(fields)
        changes = keys.changes_of(fields, now, update=True)
        record = key_store.update_key(self.engine, token, changes.columns, changes.extra, now)
        log.info("admin: key %s updated (%s)", record.token, ", ".join(sorted(fields)) or "no fields")
        return json_response({"key": record.token, **keys.describe(record)})

    def named_key(self, fields: dict) -> str:
        """The token of the key an update names: by ``key``, else (LiteLLM) by ``key_alias``, which then changes nothing."""
        key = fields.pop("key", None)
        if key is not None:
            return token_for(key)
        alias = fields.pop("key_alias", None)
        if alias is None:
            raise BadField("key is required")
        found, _total = key_store.list_keys(self.engine, size=1, key_alias=alias)
        if not found:
            raise key_store.KeyNotFound(KEY_NOT_FOUND)
        return found[0].token

    def info(self, caller):
        params = self.params({"key"})
        if caller == MASTER:
            if not params.get("key"):
                raise BadField("key is required")
            record = key_store.get_key(self.engine, token_for(params["key"]))
            if record is None:
                raise key_store.KeyNotFound(KEY_NOT_FOUND)
        else:
            # A virtual key may ask about itself (LiteLLM: no ?key= means the caller's key).
            record, presented_token = caller
            asked = params.get("key")
            if asked and token_for(asked) not in (record.token, presented_token):
                raise Refusal(403, NOT_MASTER, "auth_error")
        return json_response({"key": record.token, "info": keys.describe(record)})

    def list(self, _caller):
        params = self.params(LIST_PARAMS)
        page = self.number_param(params, "page", 1, 1_000_000)
        size = self.number_param(params, "size", DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        full = params.get("return_full_object", "false").lower()
        if full not in ("true", "false"):
            raise BadField("return_full_object must be true or false")
        extra = {name: params[name] for name in ("user_id", "team_id", "organization_id") if params.get(name)}
        token = token_for(params["key_hash"]) if params.get("key_hash") else None
        alias = params.get("key_alias") or None
        found, total = key_store.list_keys(self.engine, page=page, size=size, key_alias=alias, token=token, extra=extra)
        return json_response(
            {
                "keys": [keys.describe(record) if full == "true" else record.token for record in found],
                "total_count": total,
                "current_page": page,
                "total_pages": math.ceil(total / size),
            }
        )

    def delete(self, _caller):
        fields = self.body(keys.DELETE_FIELDS)
        # LiteLLM's client sends both fields, the unused one as null.
        named, aliases = fields.get("keys") or [], fields.get("key_aliases") or []
        if named and aliases:
            raise BadField("give keys or key_aliases, not both")
        if named:
            deleted, not_found = key_store.delete_keys(self.engine, [token_for(key) for key in named])
        elif aliases:
            deleted, not_found = key_store.delete_aliases(self.engine, aliases)
        else:
            raise BadField("keys or key_aliases is required")
        if deleted:
            log.info("admin: %d key(s) deleted: %s", len(deleted), ", ".join(deleted))
        return json_response({"deleted_keys": deleted, "not_found": not_found})

    def block(self, _caller, *, blocked: bool = True):
        fields = self.body(keys.KEY_FIELD)
        if fields.get("key") is None:
            raise BadField("key is required")
        record = key_store.set_blocked(self.engine, token_for(fields["key"]), blocked, time.time())
        log.info("admin: key %s %s", record.token, "blocked" if blocked else "unblocked")
        return json_response({"key": record.token, **keys.describe(record)})

    def unblock(self, caller):
        return self.block(caller, blocked=False)

    def regenerate(self, _caller, key: str | None = None):
        if key is not None and not keys.is_token(key):
            # The access line logs the path: it must not hold a plaintext key.
            redacted = "/key/<redacted>/regenerate"
            for name in ("RAW_URI", "REQUEST_URI", "PATH_INFO"):
                if name in request.environ:
                    request.environ[name] = redacted
        fields = self.body(keys.REGENERATE_FIELDS)
        named = fields.pop("key", None)
        if key is not None and named is not None and token_for(named) != token_for(key):
            raise BadField("the key in the path and the key in the body differ")
        key = key if key is not None else named
        if key is None:
            raise BadField("key is required")
        now = time.time()
        new_key = keys.custom_key(fields.pop("new_key"), "new_key") if fields.get("new_key") is not None else keys.new_key()
        fields.pop("new_key", None)
        grace = keys.grace_seconds(fields.pop("grace_period", None), now)
        token, new_token = token_for(key), token_of(new_key)
        if new_token == token:
            raise BadField("new_key must differ from the key it replaces")
        changes = keys.changes_of(fields, now, update=True)
        record = key_store.regenerate_key(self.engine, token, new_token, keys.key_name(new_key), grace, now, changes.columns, changes.extra)
        log.info("admin: key %s regenerated as %s (old key valid for %ds)", token, record.token, grace)
        return json_response({"key": new_key, **keys.describe(record)})

    def spend_logs(self, _caller):
        params = self.params(SPEND_PARAMS)
        limit = self.number_param(params, "limit", 100, MAX_LOG_ROWS)
        page = self.number_param(params, "page", 1, 1_000_000)
        bounds = {}
        for name in ("start_date", "end_date"):
            if params.get(name):
                try:
                    bounds[name] = keys.parse_day(params[name])
                except ValueError:
                    raise BadField(f"{name} must be a date, YYYY-MM-DD") from None
        api_key = params.get("api_key") or None
        if api_key is not None and api_key != MASTER:
            api_key = token_for(api_key)
        rows = key_store.spend_logs(
            self.engine,
            api_key_token=api_key,
            key_alias=params.get("key_alias") or None,
            start=bounds.get("start_date"),
            # end_date is inclusive: the whole of that day, UTC.
            end=None if "end_date" not in bounds else bounds["end_date"] + 86400,
            limit=limit,
            page=page,
        )
        return json_response([keys.describe_usage(row) for row in rows])


def init_app(app, settings, engine) -> Admin:
    """Register the admin routes on ``app``; ``engine`` is the worker's store (proxy_app/store.py)."""
    admin = Admin(settings, engine)
    routes = [
        ("/key/generate", "POST", admin.route(admin.generate)),
        ("/key/update", "POST", admin.route(admin.update)),
        ("/key/info", "GET", admin.route(admin.info, self_info=True)),
        ("/key/list", "GET", admin.route(admin.list)),
        ("/key/delete", "POST", admin.route(admin.delete)),
        ("/key/block", "POST", admin.route(admin.block)),
        ("/key/unblock", "POST", admin.route(admin.unblock)),
        ("/key/regenerate", "POST", admin.route(admin.regenerate)),
        ("/key/<path:key>/regenerate", "POST", admin.route(admin.regenerate)),
        ("/spend/logs", "GET", admin.route(admin.spend_logs)),
    ]
    for path, method, view in routes:
        app.add_url_rule(path, endpoint="admin:" + path, view_func=view, methods=[method], provide_automatic_options=False)
    return admin
