"""What gunicorn imports: ``gunicorn -c deploy/gunicorn.conf.py wsgi:app``."""

from proxy_app.wsgi import app  # noqa: F401
