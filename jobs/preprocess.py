"""Prepare the dataset a config describes, without training: generate the demo
videos if needed, index, and decode into sharded Parquet on Ray Data.

    python jobs/preprocess.py --config configs/coin12.yaml
    ray job submit --working-dir . -- python jobs/preprocess.py --config configs/coin12.yaml \
        <every data.* path absolute: docs/scaling.md>

Same as `vidray prepare`. Resumable: finished shards are kept. The last stdout
line is a JSON summary; config and input errors print one line and exit 2.
"""

import sys

from vidray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["prepare", *sys.argv[1:]]))
