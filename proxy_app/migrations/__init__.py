"""Alembic migrations of the store's tables (proxy_app/schema.py), run by proxy_app.migrate.upgrade."""
