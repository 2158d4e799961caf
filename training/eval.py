"""`python -m training.eval`: the command's entry point; its code is training.evaluation.eval."""

import sys

from training.evaluation.eval import main

if __name__ == "__main__":
    sys.exit(main())
