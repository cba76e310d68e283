import sys

from vistune.cli import main

sys.exit(main())
