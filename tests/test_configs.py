"""Every run config in configs/ validates; overrides work; errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vidray.cli import build_parser, preprocess_settings
from vidray.config import ConfigError, SearchRange, VidrayConfig, load_config
from vidray.tune.space import build_param_space, count_trials

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def run_configs() -> list[Path]:
    # configs/ also holds Ray cluster-launcher files (cluster_name: ...), checked by test_cluster_yaml.py.
    return [p for p in sorted(CONFIGS.glob("*.yaml")) if "cluster_name" not in (yaml.safe_load(p.read_text()) or {})]


def test_the_run_configs_are_there():
    assert {p.name for p in run_configs()} >= {"demo.yaml", "coin12.yaml", "coin12_reference.yaml"}


@pytest.mark.parametrize("path", run_configs(), ids=lambda p: p.name)
def test_every_run_config_validates_and_describes_a_sweep(path):
    cfg = load_config(path)
    build_param_space(cfg.tune, cfg.train.seed)  # raises on an empty grid
    assert count_trials(cfg.tune) >= 2
    assert cfg.tune.metric == "val_macro_f1" and cfg.tune.mode == "max"
    # The sweep's reports sit with its runs, so the run.storage_path the cluster commands give (a bucket,
    # an absolute path) keeps them too: a relative reports_dir, under `ray job submit --working-dir .`,
    # lands in the job's copy of the repository, which Ray deletes (coin12's reports/coin12 did).
    assert cfg.run.reports_dir is None


def _keys(node, prefix=""):
    keys = set()
    for key, value in node.items():
        keys.add(prefix + key)
        if isinstance(value, dict) and not set(value) <= {"low", "high"}:
            keys |= _keys(value, f"{prefix}{key}.")
    return keys


def test_demo_yaml_lists_every_key_of_the_schema():
    # demo.yaml is the documented reference for all keys: it must not fall behind the schema.
    written = _keys(yaml.safe_load((CONFIGS / "demo.yaml").read_text()))
    schema = _keys(VidrayConfig().model_dump(mode="json"))
    assert schema - written == set(), f"configs/demo.yaml lacks {sorted(schema - written)}"
    assert written - schema == set()


def test_demo_is_small_and_keeps_left_and_right_apart():
    cfg = load_config(CONFIGS / "demo.yaml")
    assert cfg.data.source == "demo" and cfg.model.init == "scratch" and cfg.model.size == "tiny"
    assert cfg.train.hflip is False  # a flipped square_moving_right is a square_moving_left
    assert 0.0 in cfg.tune.mixup_alpha and 0.4 in cfg.tune.mixup_alpha


def test_coin12_reference_is_exactly_the_reference_recipe():
    cfg = load_config(CONFIGS / "coin12_reference.yaml")
    assert cfg.data.source == "coin"
    assert (cfg.data.min_duration, cfg.data.max_duration) == (10, 60)
    assert (cfg.data.frames, cfg.data.size) == (16, 112)
    assert cfg.model.name_or_path == "MCG-NJU/videomae-base-finetuned-kinetics" and cfg.model.init == "pretrained"
    assert (cfg.train.epochs, cfg.train.batch_size) == (15, 32)
    assert (cfg.train.warmup_epochs, cfg.train.layer_decay, cfg.train.label_smoothing) == (0, 1.0, 0.0)
    assert cfg.tune.mixup_alpha == [0.0, 0.4] and cfg.tune.lr == [5e-5] and cfg.tune.weight_decay == [0.05]
    assert cfg.tune.asha is False and count_trials(cfg.tune) == 2


def test_coin12_improves_on_the_reference_and_samples_lr_log_uniformly():
    cfg = load_config(CONFIGS / "coin12.yaml")
    assert cfg.model.interpolate_pos_embed and cfg.train.layer_decay < 1 and cfg.train.label_smoothing > 0
    assert cfg.train.warmup_epochs > 0 and cfg.tune.asha
    assert isinstance(cfg.tune.lr, SearchRange) and cfg.tune.lr.low < 5e-5 < cfg.tune.lr.high
    space = build_param_space(cfg.tune, cfg.train.seed)
    assert space["mixup_alpha"] == {"grid_search": [0.0, 0.2, 0.4, 0.8]}
    from ray.tune.search.variant_generator import generate_variants

    trials = [config for _, config in generate_variants(space)]
    assert len(trials) == 12 and all(cfg.tune.lr.low <= t["lr"] <= cfg.tune.lr.high for t in trials)
    # The α comparison is paired: every α trains the same num_samples (lr, wd) points.
    points = {t["mixup_alpha"]: set() for t in trials}
    for t in trials:
        points[t["mixup_alpha"]].add((t["lr"], t["weight_decay"]))
    assert all(len(p) == cfg.tune.num_samples and p == points[0.0] for p in points.values())
    assert count_trials(cfg.tune) == 12


@pytest.mark.parametrize("name", ["coin12.yaml", "coin12_reference.yaml"])
def test_coin12_shuffles_its_train_split_whole_every_epoch(name):
    """With a shuffle buffer of 64 over the shards' fixed order, an epoch's order stayed close to the last one
    (positions correlated 0.92-0.96 from one epoch to the next) and the partial batch dropped each epoch always
    came from the end of the stored order: no video in its first 388 positions was ever dropped. The reference's
    Trainer shuffles the whole split every epoch; so does this config, its 714 train videos in its buffer."""
    import numpy as np

    from vidray.train.batches import shuffle_buffer_order, shuffle_size, train_shuffle_seed

    train = load_config(CONFIGS / name).train
    videos, batch = 714, train.batch_size  # COIN-12's train split at 10-60 s (docs/scaling.md), one worker
    orders = [list(shuffle_buffer_order(range(videos), shuffle_size(train, batch), train_shuffle_seed(train, epoch, 0)))
              for epoch in range(train.epochs)]  # fmt: skip
    position = [np.argsort(order) for order in orders]
    assert abs(np.corrcoef(position[0], position[1])[0, 1]) < 0.2
    dropped = {video for order in orders for video in order[videos - videos % batch :]}
    assert min(dropped) < 100


def test_overrides_apply_on_top_of_a_file():
    cfg = load_config(CONFIGS / "demo.yaml", ["train.epochs=2", "tune.mixup_alpha=[0.0, 0.2, 0.8]", "tune.lr={low: 1e-5, high: 1e-3}"])
    assert cfg.train.epochs == 2
    assert cfg.tune.mixup_alpha == [0.0, 0.2, 0.8]
    assert cfg.tune.lr == SearchRange(low=1e-5, high=1e-3)


def test_paths_under_the_home_are_expanded_where_no_shell_did(monkeypatch, tmp_path):
    """`~` in a YAML file or a quoted override: the home's folder, as a shell would give it; Hub ids, URIs and
    relative paths as they are."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(CONFIGS / "demo.yaml", ["data.videos_dir=~/videos", "data.dataset_dir=~/ds", "data.annotations=[~/COIN.json]",
                                              "data.taxonomy=~/tax.csv", "model.name_or_path=~/encoder"])  # fmt: skip
    assert (cfg.data.videos_dir, cfg.data.taxonomy, cfg.data.annotations) == (tmp_path / "videos", tmp_path / "tax.csv", [tmp_path / "COIN.json"])
    assert (cfg.data.dataset_dir, cfg.model.name_or_path) == (str(tmp_path / "ds"), str(tmp_path / "encoder"))
    cfg = load_config(CONFIGS / "demo.yaml", ["data.dataset_dir=s3://bucket/ds", "data.manifest=data/m.parquet"])
    assert (cfg.data.dataset_dir, cfg.data.manifest) == ("s3://bucket/ds", Path("data/m.parquet"))
    assert load_config(CONFIGS / "coin12.yaml").model.name_or_path == "MCG-NJU/videomae-base-finetuned-kinetics"


def test_a_run_hands_its_workers_a_local_model_by_its_absolute_path(monkeypatch, tmp_path):
    """Ray Train's workers run in folders of their own (its RAY_CHDIR_TO_TRIAL_DIR), where a relative
    model.name_or_path that the driver had checked was taken for a hub id: `vidray train` and `vidray
    pretrain` failed in every worker with a traceback (a sweep's trials already got it absolute)."""
    from vidray.train.driver import on_shared_storage

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "demo").mkdir(parents=True)
    shared = ["run.shared_filesystem=true", "run.storage_path=runs", "data.dataset_dir=ds"]  # no Ray asked
    cfg = on_shared_storage(load_config(CONFIGS / "demo.yaml", [*shared, "model.name_or_path=models/demo"]), "vidray train")
    assert (cfg.model.name_or_path, cfg.run.storage_path, cfg.data.dataset_dir) == (
        str(tmp_path / "models" / "demo"), str(tmp_path / "runs"), str(tmp_path / "ds"))  # fmt: skip
    hub = on_shared_storage(load_config(CONFIGS / "coin12.yaml", shared), "vidray train")
    assert hub.model.name_or_path == "MCG-NJU/videomae-base-finetuned-kinetics"  # no such folder here: a hub id


@pytest.mark.parametrize("command", ["vidray train", "vidray pretrain", "vidray tune"])
def test_every_run_warns_of_an_output_path_a_ray_job_would_lose(monkeypatch, tmp_path, capsys, command):
    """Under `ray job submit --working-dir .` the job runs in a copy of the folder that Ray deletes (under
    .../runtime_resources/working_dir_files/), and a relative run.storage_path or run.reports_dir lands there:
    only `vidray tune` said so. Every command gives its paths to its workers through on_shared_storage."""
    from vidray.train.driver import on_shared_storage

    job_copy = tmp_path / "session_latest" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    job_copy.mkdir(parents=True)
    monkeypatch.chdir(job_copy)
    shared = ["run.shared_filesystem=true", "data.dataset_dir=/data/ds"]  # no Ray asked
    on_shared_storage(load_config(CONFIGS / "demo.yaml", [*shared, "run.storage_path=runs", "run.reports_dir=reports"]), command)
    named = "run.storage_path is relative, so it points" if command == "vidray train" else (
        "run.storage_path and run.reports_dir are relative, so they point")  # a training run writes no reports
    assert capsys.readouterr().err == (
        f"{command}: warning: {named} into this job's working-directory copy ({job_copy}), which Ray deletes; use an "
        "absolute path (the default is ~/ray_results)\n"
    )
    on_shared_storage(load_config(CONFIGS / "demo.yaml", [*shared, "run.reports_dir=reports"]), command)
    reports_named = "warning: run.reports_dir is relative, so it points into this job's" in capsys.readouterr().err
    assert reports_named == (command != "vidray train")
    on_shared_storage(load_config(CONFIGS / "demo.yaml", [*shared, "run.storage_path=/srv/runs"]), command)
    assert capsys.readouterr().err == ""
    monkeypatch.chdir(tmp_path)  # a plain folder: relative paths are the user's own
    on_shared_storage(load_config(CONFIGS / "demo.yaml", [*shared, "run.storage_path=runs"]), command)
    assert capsys.readouterr().err == ""


def test_one_value_where_a_key_takes_a_list_is_a_list_of_one():
    """`tune.lr=1e-4` is the one-value grid: pydantic alone refused it with an error for each form the key
    takes ("Input should be a valid dictionary or instance of SearchRange; ...list[float]: Input should be a
    valid list")."""
    cfg = load_config(CONFIGS / "demo.yaml", ["tune.lr=1e-4", "tune.weight_decay=0.1", "tune.mixup_alpha=0.4",
                                              "data.annotations=/c/COIN.json", "pretrain.splits=val"])  # fmt: skip
    assert (cfg.tune.lr, cfg.tune.weight_decay, cfg.tune.mixup_alpha) == ([1e-4], [0.1], [0.4])
    assert cfg.data.annotations == [Path("/c/COIN.json")] and cfg.pretrain.splits == ["val"]
    assert count_trials(cfg.tune) == 1
    # A range stays a range, and a list a list.
    cfg = load_config(CONFIGS / "demo.yaml", ["tune.lr={low: 1e-5, high: 1e-3}", "tune.weight_decay=[0.01, 0.1]"])
    assert cfg.tune.lr == SearchRange(low=1e-5, high=1e-3) and cfg.tune.weight_decay == [0.01, 0.1]


def test_yaml_that_does_not_parse_is_named_on_one_line(tmp_path):
    """PyYAML's own message is several lines with a caret drawing: an override's or a file's error was a wall."""
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "demo.yaml", ["train.lr=[1e-4"])
    assert str(err.value) == (
        "bad value in override 'train.lr=[1e-4': while parsing a flow sequence: "
        "expected ',' or ']', but got '<stream end>' at line 1, column 6"
    )
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  lr: 1e-4\n  epochs: 3: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(broken)
    assert str(err.value) == f"config file {broken} is not valid YAML: mapping values are not allowed here at line 3, column 12"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.learning_rate=1e-4", "train.learning_rate: unknown key"),
        ("tune.reduction_factor=1", "tune.reduction_factor"),
        ("tune.mixup_alpha=[0.4, -1]", "tune.mixup_alpha values must be >= 0"),
        # Bounded as train.lr and train.weight_decay: otherwise every such trial fails inside its worker.
        ("tune.lr=[1e-4, 0]", "tune.lr values must be > 0 and tune.weight_decay values >= 0"),
        ("tune.weight_decay=-0.1", "tune.lr values must be > 0 and tune.weight_decay values >= 0"),
        # A swept value gets the error of the form it was written in (grid or range), under its plain key.
        ("tune.lr=abc", "tune.lr.0: Input should be a valid number, unable to parse string as a number"),
        ("tune.lr={low: 1e-3, high: 1e-5}", "tune.lr: low (0.001) must be <= high (1e-05)"),
        ("tune.weight_decay={low: 0.1}", "tune.weight_decay.high: Field required"),
        ("tune.mode=best", "tune.mode"),
        ("data.frames=64", "data.stored_frames (16) must be >= data.frames (64)"),
        ("model.init=pretrained", "model.patch_size applies to init=scratch only"),
    ],
)
def test_bad_values_name_the_key(override, named):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "demo.yaml", [override])
    message = str(err.value)
    assert named in message and "configs/demo.yaml" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("override", "named"),
    [
        # inf and nan were taken as numbers: a run's lr of inf, a sweep's grid of nan.
        ("train.lr=.inf", "train.lr: Input should be a finite number"),
        ("train.max_grad_norm=.inf", "train.max_grad_norm: Input should be a finite number"),
        ("tune.lr=[.nan]", "tune.lr.0: Input should be a finite number"),
        ("tune.weight_decay={low: 0.01, high: .inf}", "tune.weight_decay.high: Input should be a finite number"),
        ("pretrain.lr=.inf", "pretrain.lr: Input should be a finite number"),
        # As a Path, s3://bucket/reports was the local folder s3:/bucket/reports, under the working directory.
        ("run.reports_dir=s3://bucket/reports", "run.reports_dir: s3://bucket/reports is a URI, but reports are written on this machine"),
        # prepare.py indexes a demo or folder source without COIN's duration filter: it was ignored without a word.
        ("data.min_duration=10", "data.min_duration applies to data.source=coin only (demo keeps every video): remove it"),
    ],
)
def test_values_that_never_worked_are_refused_naming_the_key(override, named):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "demo.yaml", [override])
    assert named in str(err.value) and "\n" not in str(err.value)


def test_a_key_repeated_in_a_config_file_is_refused(tmp_path):
    """YAML keeps a repeated key's last value: a `train:` appended to coin12.yaml replaced its whole train section
    (use_gpu, layer_decay, label_smoothing back to their defaults) without a word."""
    appended = tmp_path / "coin12_30.yaml"
    text = (CONFIGS / "coin12.yaml").read_text()
    appended.write_text(text + "train:\n  epochs: 30\n")
    first, last = text.splitlines().index("train:") + 1, len(text.splitlines()) + 1
    with pytest.raises(ConfigError) as err:
        load_config(appended)
    assert str(err.value) == (f"config file {appended} is not valid YAML: the key train is given twice, at lines {first} and "
                              f"{last} (YAML would keep only the last): merge them")  # fmt: skip
    nested = tmp_path / "nested.yaml"
    for body, key, lines in [("# lines count from 1\ntrain:\n  lr: 1e-4\n  epochs: 2\n  lr: 2e-4\n", "train.lr", "3 and 5"),
                             ("tune: {lr: {low: 1.0e-5, low: 1.0e-4, high: 1.0e-3}}\n", "tune.lr.low", "1 and 1")]:  # fmt: skip
        nested.write_text(body)
        with pytest.raises(ConfigError) as err:
            load_config(nested)
        assert str(err.value).endswith(f"the key {key} is given twice, at lines {lines} (YAML would keep only the last): merge them")
    nested.write_text("train: &t {epochs: 2}\npretrain: *t\n")  # an alias repeats a mapping, not a key
    assert (load_config(nested).train.epochs, load_config(nested).pretrain.epochs) == (2, 2)


def test_a_text_key_takes_an_override_as_typed(tmp_path):
    """`run.name=2024-06-01` (a YAML date), `run.name=42` and `run.wandb.project=2024` were refused ("Input should be
    a valid string") and shell quotes never reach YAML: a text key takes the text as typed. Other keys keep YAML's
    types, and a file keeps YAML's meaning, its error saying to quote the value."""
    cfg = load_config(CONFIGS / "demo.yaml", ["run.name=2024-06-01", "run.wandb.project=2024", "data.videos_dir=2024",
                                              "tune.metric=1", "train.epochs=2"])  # fmt: skip
    assert (cfg.run.name, cfg.run.wandb.project, cfg.data.videos_dir, cfg.tune.metric) == ("2024-06-01", "2024", Path("2024"), "1")
    assert cfg.train.epochs == 2
    assert load_config(None, ["run.name=42"]).run.name == "42"
    assert load_config(None, ["run.name='my run'"]).run.name == "my run"  # quoted as YAML: unquoted, as before
    with pytest.raises(ConfigError, match="train.epochs: Input should be a valid integer"):
        load_config(None, ["train.epochs=2024-06-01"])
    config = tmp_path / "dated.yaml"
    config.write_text("run:\n  name: 2024-06-01\n")
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert str(err.value) == (f"invalid config {config}: run.name: Input should be a valid string "
                              "(YAML read 2024-06-01 as date: put it in quotes)")  # fmt: skip
    config.write_text('run:\n  name: "2024-06-01"\n')
    assert load_config(config).run.name == "2024-06-01"
    # Null, lists and maps are no text: refused as before (data.dataset_dir=null wrote the dataset to a folder ./null).
    for override in ("data.dataset_dir=null", "run.storage_path=[a, b]", "run.name={a: 1}"):
        with pytest.raises(ConfigError, match="Input should be a valid string"):
            load_config(None, [override])


def test_the_stored_clip_follows_a_larger_model_input_unless_set():
    """data.stored_* default to 32 frames of 128 px: `vidray train data.size=224` (ViT-B's input) was refused, "stored_size
    (128) must be >= data.size (224)", and `vidray preprocess --size 224` once it took the config's defaults. A larger
    input now stores 2x its frames and 8/7 of its size; up to 16 frames of 112 px the defaults stand, so the shards of
    every dataset made before keep their ids."""
    stored = lambda *overrides: (lambda d: (d.stored_frames, d.stored_size))(load_config(None, list(overrides)).data)
    assert stored() == stored("data.frames=8", "data.size=64") == (32, 128)
    assert stored("data.size=224") == (32, 256) and stored("data.frames=48") == (96, 128)
    assert stored("data.size=224", "data.stored_size=240", "data.stored_frames=20") == (20, 240)
    with pytest.raises(ConfigError, match=r"data.stored_size \(200\) must be >= data.size \(224\)"):
        load_config(None, ["data.size=224", "data.stored_size=200"])
    args = build_parser().parse_args(["preprocess", "--manifest", "m.parquet", "--out", "ds", "--size", "224"])
    assert (preprocess_settings(args).stored_frames, preprocess_settings(args).stored_size) == (32, 256)


def test_a_run_started_with_an_ignored_coin_filter_continues_without_it():
    """A folder run started with data.min_duration (ignored then, refused now) is continued without it: the filter
    never applied, so the saved config does not differ for it. On a COIN source it does."""
    from vidray.config import config_differences

    new = load_config(None, ["data.source=folder"]).model_dump(mode="json")
    saved = {**new, "data": {**new["data"], "min_duration": 10.0, "max_duration": 60.0}}
    assert config_differences(saved, new) == []
    coin = load_config(None, ["data.source=coin"]).model_dump(mode="json")
    saved = {**coin, "data": {**coin["data"], "min_duration": 10.0}}
    assert config_differences(saved, coin) == ["data.min_duration"]
