import sys

from pice.cli import main

sys.exit(main())
