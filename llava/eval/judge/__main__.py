import sys

from llava.eval.judge.cli import main

sys.exit(main())
