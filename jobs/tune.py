"""The main job: a Ray Tune sweep over MixUp α, learning rate and weight decay.

    python jobs/tune.py                                        # the embedded demo: what `make demo` runs
    python jobs/tune.py --config configs/coin12.yaml tune.num_samples=4
    python jobs/tune.py --config configs/coin12.yaml --restart # discard that sweep and start over
    ray job submit --working-dir . -- python jobs/tune.py   # the demo as a job; COIN on a cluster: docs/scaling.md

Same as `vidray tune`: prints the results table and its path; the last stdout
line is a JSON summary with absolute paths; config and input errors print one
line and exit 2. Run it again and a finished sweep is reported again (its best
checkpoint evaluated and exported anew) without training, an interrupted one continues.
"""

import sys

from vidray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["tune", *sys.argv[1:]]))
