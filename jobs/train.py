"""Fine-tune VideoMAE on Ray Train; the entrypoint for `ray job submit`.

    python jobs/train.py train.epochs=3 train.num_workers=2 run.name=demo_train   # the embedded demo config

Same as `vidray train`: the last stdout line is a JSON summary (run dir, best
and last metrics, checkpoint paths); config errors print one line and exit 2.
"""

import sys

from vidray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
