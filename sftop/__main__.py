import sys

from sftop.cli import main

sys.exit(main())
