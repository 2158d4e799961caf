"""`python -m training.eval_labeler`: the command's entry point; its code is training.evaluation.eval_labeler."""

import sys

from training.evaluation.eval_labeler import main

if __name__ == "__main__":
    sys.exit(main())
