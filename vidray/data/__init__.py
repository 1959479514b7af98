"""Stage 1, the data: synthetic demo videos (demo), folder and COIN indexing into a manifest
(index, coin), decoding one video (video; what every decoder shares in clip, one library each in
decode/), preprocessing a manifest into the sharded Parquet dataset (preprocess: shards,
decode_shard, shard_files, ray_decode), the dataset contract (dataset), and config -> ready
dataset (prepare). Imports the shared modules (config, errors, storage, cluster) only.
"""
