"""The checkout's WSGI entry point: ``gunicorn -c deploy/gunicorn.conf.py wsgi:app``.

The same app as ``proxy_app.wsgi:app``, which the gunicorn settings name by default
(``wsgi_app`` in proxy_app/gunicorn_conf.py) and which needs no checkout.
"""

from proxy_app.wsgi import app  # noqa: F401
