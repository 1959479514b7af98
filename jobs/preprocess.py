"""Prepare the dataset a config describes, without training: generate the demo
videos if needed, index, and decode into sharded Parquet on Ray Data.

    python jobs/preprocess.py --config configs/coin12.yaml
    ray job submit --working-dir . -- python jobs/preprocess.py --config configs/coin12.yaml

Resumable: finished shards are kept. The last stdout line is a JSON summary;
config and input errors print one line and exit 2.
"""

import argparse
import json
import sys

from vidray.errors import UserError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml", help="YAML config (default: configs/demo.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. data.frames=16")
    args = parser.parse_args(argv)
    try:
        from vidray.cluster import init_ray
        from vidray.config import load_config
        from vidray.dataset import read_dataset_info
        from vidray.prepare import prepare_dataset

        cfg = load_config(args.config, args.overrides)
        init_ray()
        dataset_dir = prepare_dataset(cfg)
        info = read_dataset_info(dataset_dir)
    except UserError as err:
        print(f"preprocess: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"dataset_dir": dataset_dir, "classes": info.num_classes, "videos": info.split_counts}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
