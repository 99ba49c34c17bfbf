"""gunicorn settings for a checkout: ``gunicorn -c deploy/gunicorn.conf.py [wsgi:app]``.

The settings and hooks live in the package, in proxy_app/gunicorn_conf.py (an installed
package is served with ``gunicorn -c python:proxy_app.gunicorn_conf``, which is what the
``proxy-app`` command does); this file only makes its own checkout importable and takes
everything from there, so there is one copy of every setting.

gunicorn executes a config file before it applies ``--chdir`` (gunicorn/app/base.py,
``Application.load_config``), so the checkout is found from this file's own path, not from
the working directory, and this works from anywhere:

    cd /tmp && gunicorn --chdir /opt/proxy-app -c /opt/proxy-app/deploy/gunicorn.conf.py wsgi:app

When proxy_app is importable already (installed into the virtualenv), that copy is used and
``sys.path`` is left alone; the start-up log names the directory proxy_app was loaded from.
gunicorn executes this file again on every HUP; the package module is imported only once,
so the settings (and the metrics directory) chosen at start stay as they were. Every global
defined here other than the imported settings starts with "_": gunicorn would take any
global named like one of its settings.
"""

import importlib.util as _importlib_util
import os as _os
import sys as _sys

_CHECKOUT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _importlib_util.find_spec("proxy_app") is None and _CHECKOUT not in _sys.path:
    _sys.path.insert(0, _CHECKOUT)

from proxy_app.gunicorn_conf import *  # noqa: E402, F403 - every setting and hook (its __all__)
