import sys

from eapcore.cli import main

sys.exit(main())
