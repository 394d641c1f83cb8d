import sys

from ood.cli import main

sys.exit(main())
