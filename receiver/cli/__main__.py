"""`python -m receiver.cli`: the `gitea-flux-bridge` command."""

import sys

from receiver.cli import main

sys.exit(main())
