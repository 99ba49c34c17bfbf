import sys

from proxy_app.cli import main

sys.exit(main())
