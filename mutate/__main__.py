"""``python -m mutate``: the mitigation audit (mutate.run)."""

import sys

from mutate.run import main

sys.exit(main())
