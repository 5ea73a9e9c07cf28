"""`python -m agentd.agents pkg.mod:Class`: run an agent class on the bus."""

import sys

from .sdk import main

sys.exit(main())
