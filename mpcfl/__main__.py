import sys

from mpcfl.cli import main

sys.exit(main())
