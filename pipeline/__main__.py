import sys

from pipeline.entrypoints.cli import MODULE_PROG, main

sys.exit(main(prog=MODULE_PROG))
