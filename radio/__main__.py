import sys

from radio.cli import main

sys.exit(main())
