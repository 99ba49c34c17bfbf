"""Alembic's environment: proxy_app.migrate.upgrade runs it with the connection it locked.

There is no alembic.ini and no offline (SQL script) mode: the migrations run in the proxy
itself, at start-up, on the connection passed in ``config.attributes["connection"]``, inside the
transaction proxy_app.migrate opened (so Alembic neither begins nor commits one of its own).
"""

from __future__ import annotations

from alembic import context

from proxy_app import schema

connection = context.config.attributes.get("connection")
if context.is_offline_mode() or connection is None:
    raise RuntimeError("proxy_app's migrations run through proxy_app.migrate.upgrade(engine), with a connection")

context.configure(
    connection=connection,
    target_metadata=schema.metadata,
    # SQLite's ALTER TABLE cannot change or drop most things: Alembic's batch mode copies the
    # table instead (https://alembic.sqlalchemy.org/en/latest/batch.html).
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
