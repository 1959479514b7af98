"""VideoMAE masked-autoencoder pretraining on Ray Train; the entrypoint for `ray job submit`.

    python jobs/pretrain.py --config configs/demo.yaml pretrain.epochs=50 train.num_workers=2

Same as `vidray pretrain`: the last stdout line is a JSON summary whose
`model_dir` is the encoder to fine-tune from (`vidray train
model.init=pretrained model.name_or_path=<model_dir>`, plus `model.patch_size=null
model.tubelet_size=null` with a config that sets scratch sizes, as demo.yaml does);
config errors print one line and exit 2.
"""

import sys

from vidray.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["pretrain", *sys.argv[1:]]))
