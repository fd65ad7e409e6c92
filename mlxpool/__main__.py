import sys

from mlxpool.cli import main

sys.exit(main())
