"""`python -m training.align`: the command's entry point; its code is training.labeling.align."""

import sys

from training.labeling.align import main

if __name__ == "__main__":
    sys.exit(main())
