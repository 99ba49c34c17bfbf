"""The endpoint API, LiteLLM's ``/config/pass_through_endpoint`` (SPEC §10), master key only.

- ``GET`` lists the config file's endpoints (``is_from_config: true``, ids ``config-<index>``)
  and the stored ones, every field at its effective value, literal header values as
  "<redacted>" and ``os.environ/NAME`` references as written.
- ``POST`` creates one: the config file's fields, checked by the config file's validator with
  its messages (400 naming the field). A path and method already served is 409; the same
  ``id`` posted again with the same fields is a 200 no-op, with other fields a 409.
- ``POST /{id}`` changes some fields; a null resets one to its default.
- ``DELETE ?endpoint_id=`` removes one; unknown is 404.
- A config-file endpoint cannot be changed or removed here (409: edit the file, reload).

Rules in proxy_app/endpoint_rules.py, rows in proxy_app/endpoint_store.py, secrets in
proxy_app/endpoint_secrets.py; the worker serving the call reloads its routing table at once
(proxy_app/endpoint_table.py), every other one at its next change-notice poll. Each change is
logged with the path, the id and the call, never a header value.
"""

from __future__ import annotations

import logging
import time
import uuid

from flask import request
from sqlalchemy.exc import SQLAlchemyError

from proxy_app import endpoint_store
from proxy_app.admin import Admin
from proxy_app.admin import json_response
from proxy_app.config import check_entry
from proxy_app.endpoint_rules import REDACTED
from proxy_app.endpoint_rules import config_id
from proxy_app.endpoint_rules import effective
from proxy_app.endpoint_rules import id_problem
from proxy_app.endpoint_rules import is_secret
from proxy_app.endpoint_rules import join_secrets
from proxy_app.endpoint_rules import merge
from proxy_app.endpoint_rules import null_to_absent
from proxy_app.endpoint_rules import overlap
from proxy_app.endpoint_rules import placeholder_problems
from proxy_app.endpoint_rules import redacted
from proxy_app.endpoint_rules import split_secrets
from proxy_app.endpoint_secrets import SALT_KEY_ENV
from proxy_app.endpoint_secrets import SecretsUnavailable
from proxy_app.endpoint_secrets import seal
from proxy_app.endpoint_secrets import unseal
from proxy_app.endpoint_table import STORED_SOURCE
from proxy_app.endpoint_table import EndpointTable
from proxy_app.errors import Refusal
from proxy_app.keys import BadField

log = logging.getLogger("proxy_app")

PATH = "/config/pass_through_endpoint"
BODY = "request body"
NOT_FOUND = "endpoint not found"
FROM_CONFIG = "endpoint {id} comes from the config file: edit the file and reload (SIGHUP) to change or remove it"


class EndpointAdmin:
    def __init__(self, admin: Admin, table: EndpointTable) -> None:
        self.admin = admin
        self.table = table
        self.engine = admin.engine

    # --- reading ---------------------------------------------------------------------------------

    def list(self, _caller):
        params = self.admin.params({"endpoint_id"})
        wanted = params.get("endpoint_id") or None
        shown = [self.describe_config(e) for e in self.table.settings.endpoints]
        shown += [self.describe_stored(row.id, row.entry) for row in endpoint_store.list_stored(self.engine)]
        if wanted is not None:
            shown = [e for e in shown if e["id"] == wanted]
            if not shown:
                raise Refusal(404, NOT_FOUND, "not_found_error")
        return json_response({"endpoints": shown})

    @staticmethod
    def describe_config(endpoint) -> dict:
        return {"id": config_id(endpoint.index), **redacted(endpoint.written), "is_from_config": True}

    @staticmethod
    def describe_stored(endpoint_id: str, entry: dict) -> dict:
        return {"id": endpoint_id, **redacted(entry), "is_from_config": False}

    # --- changing ----------------------------------------------------------------------------------

    def create(self, _caller):
        body = self.object_body()
        endpoint_id = body.pop("id", None)
        if endpoint_id is None:
            endpoint_id = uuid.uuid4().hex
        elif problem := id_problem(endpoint_id):
            raise BadField(f"{BODY}: id: {problem}")
        entry = null_to_absent(body)
        self.check(entry, placeholder_problems(entry))
        with endpoint_store.changing(self.engine) as change:
            existing = endpoint_store.get_stored(change.conn, endpoint_id)
            if existing is not None:
                if self.opened(existing, needed=False) == effective(entry):
                    return json_response(self.describe_stored(existing.id, existing.entry))  # a retry: nothing to do
                raise Refusal(
                    409,
                    f"endpoint {endpoint_id} exists with other fields; change it with POST {PATH}/{endpoint_id}",
                    "conflict_error",
                )
            self.refuse_overlap(change, entry, endpoint_id)
            stored, sealed = self.sealed(entry)
            endpoint_store.add(change, endpoint_id, stored, sealed, time.time())
        self.changed("created", stored["path"], endpoint_id)
        return json_response(self.describe_stored(endpoint_id, stored))

    def update(self, _caller, endpoint_id: str):
        self.refuse_config(endpoint_id)
        body = self.object_body()
        if "id" in body and body.pop("id") not in (None, endpoint_id):
            raise BadField(f"{BODY}: id: differs from the id in the path (an endpoint's id cannot change)")
        with endpoint_store.changing(self.engine) as change:
            existing = endpoint_store.get_stored(change.conn, endpoint_id)
            if existing is None:
                raise Refusal(404, NOT_FOUND, "not_found_error")
            # The stored values are needed unless the update replaces every header value.
            current = self.opened(existing, needed=bool(existing.sealed) and ("headers" not in body or _keeps_a_header(body)))
            entry, problems = merge(current, body)
            self.check(entry, problems)
            if effective(entry) == current:
                return json_response(self.describe_stored(existing.id, existing.entry))
            self.refuse_overlap(change, entry, endpoint_id)
            stored, sealed = self.sealed(entry)
            endpoint_store.replace(change, endpoint_id, stored, sealed, time.time())
        self.changed(f"updated ({', '.join(sorted(body)) or 'no fields'})", stored["path"], endpoint_id)
        return json_response(self.describe_stored(endpoint_id, stored))

    def delete(self, _caller):
        params = self.admin.params({"endpoint_id"})
        endpoint_id = params.get("endpoint_id")
        if not endpoint_id:
            raise BadField("endpoint_id is required")
        self.refuse_config(endpoint_id)
        with endpoint_store.changing(self.engine) as change:
            existing = endpoint_store.get_stored(change.conn, endpoint_id)
            if existing is None or not endpoint_store.remove(change, endpoint_id):
                raise Refusal(404, NOT_FOUND, "not_found_error")
        self.changed("deleted", existing.entry["path"], endpoint_id)
        return json_response({"endpoints": [self.describe_stored(existing.id, existing.entry)]})

    # --- the steps ----------------------------------------------------------------------------------

    def object_body(self) -> dict:
        body = self.admin.json_body(None)
        if not isinstance(body, dict):
            raise BadField("The request body must be a JSON object with the endpoint's fields.")
        # What GET lists for a stored endpoint may be posted back as it is.
        if body.get("is_from_config") in (False, None):
            body.pop("is_from_config", None)
        else:
            raise BadField(f"{BODY}: is_from_config: only the config file makes config endpoints (edit the file and reload)")
        return body

    def check(self, entry: dict, problems: list[str]) -> None:
        """400 with every problem the config file's validator finds in ``entry``, and those given."""
        settings = self.table.settings
        checked = check_entry(
            entry,
            self.table.environ,
            master_key=settings.master_key,
            source=BODY,
            label="endpoint",
            default_timeout=settings.default_timeout,
        )
        found = [f"{BODY}: {p}" for p in problems] + list(checked.problems)
        headers = entry.get("headers")
        literals = [name for name, value in headers.items() if is_secret(name, value)] if isinstance(headers, dict) else []
        if literals and self.table.fernet is None:
            found.append(
                f"{BODY}: headers.{', headers.'.join(literals)}: a literal header value is stored encrypted with "
                f"{SALT_KEY_ENV}, which is not set; set it, or give the value as os.environ/NAME"
            )
        if found:
            raise BadField("; ".join(found))

    def refuse_overlap(self, change, entry: dict, endpoint_id: str) -> None:
        """409 when the path and one of the methods are served already (the config file, or another stored endpoint)."""
        others = self.table.config_places() + [
            (f"{STORED_SOURCE} {row.id}", row.entry["path"], row.entry["methods"])
            for row in endpoint_store.list_stored(change.conn)
            if row.id != endpoint_id
        ]
        wanted = effective(entry)
        clash = overlap(wanted["path"], wanted["methods"], others)
        if clash is not None:
            raise Refusal(
                409,
                f"{wanted['path']} {', '.join(clash[1])} is already served by {clash[0]}; give this endpoint other methods or another path",
                "conflict_error",
            )

    def refuse_config(self, endpoint_id: str) -> None:
        if any(config_id(e.index) == endpoint_id for e in self.table.settings.endpoints):
            raise Refusal(409, FROM_CONFIG.format(id=endpoint_id), "conflict_error")

    def opened(self, row, *, needed: bool) -> dict:
        """The stored effective entry, its literal header values in clear when this instance can
        open them; when it cannot and they are not ``needed``, they stay "<redacted>"."""
        try:
            return join_secrets(row.entry, unseal(row.sealed, self.table.fernet) if row.sealed else {})
        except SecretsUnavailable as exc:
            if needed:
                raise BadField(f"{BODY}: headers: endpoint {row.id} {exc}") from None
            return dict(row.entry)

    def sealed(self, entry: dict) -> tuple[dict, str | None]:
        written, literals = split_secrets(effective(entry))
        return written, seal(literals, self.table.fernet) if literals else None

    def changed(self, action: str, path: str, endpoint_id: str) -> None:
        log.info("admin: endpoint %s (id %s) %s by %s %s", path, endpoint_id, action, request.method, request.path)
        # This worker serves the change at once; the others at their next change-notice poll.
        try:
            self.table.reload()
        except SQLAlchemyError:
            # The change is committed; this worker's watcher loads it once the database answers.
            log.warning("admin: endpoint %s (id %s) is stored; this worker serves it once the database answers again", path, endpoint_id)


def _keeps_a_header(body: dict) -> bool:
    headers = body.get("headers")
    return isinstance(headers, dict) and REDACTED in headers.values()


def init_app(app, admin: Admin, table: EndpointTable) -> None:
    api = EndpointAdmin(admin, table)
    routes = [
        (PATH, "GET", api.list),
        (PATH, "POST", api.create),
        (PATH + "/<endpoint_id>", "POST", api.update),
        (PATH, "DELETE", api.delete),
    ]
    for path, method, view in routes:
        name = f"admin:{method} {path}"
        app.add_url_rule(path, endpoint=name, view_func=admin.route(view), methods=[method], provide_automatic_options=False)
