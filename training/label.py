"""`python -m training.label`: the command's entry point; its code is training.labeling.label."""

import sys

from training.labeling.label import main

if __name__ == "__main__":
    sys.exit(main())
