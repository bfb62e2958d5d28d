"""``python -m ssn_core`` runs the command line (see ssn_core/cli/)."""

import sys

from ssn_core.cli import main

sys.exit(main())
