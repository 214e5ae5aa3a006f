"""``python -m kdistill.cli``: the same as the ``kdistill`` command."""

import sys

from kdistill.cli.app import main

sys.exit(main())
