import sys

from objfs.cli import main

sys.exit(main())
