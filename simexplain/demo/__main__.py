"""``python -m simexplain.demo``: the end-to-end demo (see :mod:`simexplain.demo.run`)."""

import sys

from .run import main

sys.exit(main())
