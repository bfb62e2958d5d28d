"""``python -m ssn_core.cli`` runs the command line, as ``python -m ssn_core`` does."""

import sys

from ssn_core.cli import main

sys.exit(main())
