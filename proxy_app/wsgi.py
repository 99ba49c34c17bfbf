"""The WSGI app gunicorn serves.

Under the gunicorn master (proxy_app/gunicorn_conf.py) the config was validated there, before
this worker was forked, and is taken from :mod:`proxy_app.lifecycle`; that is what lets a
HUP with an invalid new config keep serving the old one. Imported on its own (another WSGI
server), it reads ``CONFIG_FILE_PATH`` (default ``./config.yaml``) itself.
"""

import logging
import sys

from proxy_app import create_app
from proxy_app import lifecycle
from proxy_app.config import ConfigError
from proxy_app.config import print_problems

if not logging.getLogger("proxy_app").handlers:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

try:
    app = create_app(lifecycle.current())
except ConfigError as exc:
    print_problems(exc)
    # 3 is gunicorn's WORKER_BOOT_ERROR: the arbiter stops instead of re-spawning.
    sys.exit(3)
