"""What gunicorn imports: ``gunicorn -c deploy/gunicorn.conf.py wsgi:app``.

The config is read from ``CONFIG_FILE_PATH`` (default ``./config.yaml``).
"""

import logging
import sys

from proxy_app import create_app
from proxy_app.config import ConfigError

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

try:
    app = create_app()
except ConfigError as exc:
    for line in exc.problems:
        print(f"config error: {line}", file=sys.stderr)
    # 3 is gunicorn's WORKER_BOOT_ERROR: the arbiter stops instead of re-spawning.
    sys.exit(3)
