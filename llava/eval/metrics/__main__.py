import sys

from llava.eval.metrics.cli import main

sys.exit(main())
