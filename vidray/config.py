"""Typed, validated run configuration: one YAML file (``configs/*.yaml``) maps onto :class:`VidrayConfig`; dotted
command-line overrides (``data.frames=16 train.lr=1e-4``) are applied on top before validation, so a typo or a bad
value fails before any Ray work starts."""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, ValidationError
from pydantic import field_validator, model_validator

from vidray.errors import UserError, yaml_problem
from vidray.storage import LOCAL_RESULTS, local_mirror

# data.decoder's libraries and data.decoder_device's devices, here as the config names them (vidray/data/video.py maps them).
DecoderName = Literal["pyav", "decord", "torchcodec"]
DECODERS: tuple[str, ...] = get_args(DecoderName)
DecodeDevice = Literal["cpu", "cuda"]
DEFAULT_DECODER: DecoderName = "pyav"  # least CPU per video of the three (docs/benchmarks.md)
# How the decoded frames are stored in the shards (data.store; vidray/data/store.py reads and writes them).
StoreName = Literal["raw", "jpeg"]
STORES: tuple[str, ...] = get_args(StoreName)
Dispatch = Literal["ray_data", "ray_tasks"]
DISPATCHES: tuple[str, ...] = get_args(Dispatch)
# A dataset's splits, in order (vidray/data/dataset.py; the CLI offers them without importing the data stage).
SPLITS: tuple[str, ...] = ("train", "val", "test")
COIN_FILTERS = ("min_duration", "max_duration")  # data.*: COIN's duration filter, refused with another source
DEFAULT_JPEG_QUALITY = 90  # >= 8x smaller than raw at 38.5 dB on real footage (docs/benchmarks.md, "Stored format")


class ConfigError(UserError):
    """A configuration problem, with a one-line message that names the key."""


def _home_expanded(value: Any) -> Any:
    """``~`` in a local path made absolute: a shell expands it on a command line, not in a YAML file or a quoted override,
    where ``data.videos_dir: ~/videos`` would be refused as missing (or read and written as two different folders)."""
    if isinstance(value, list):
        return [_home_expanded(item) for item in value]
    return type(value)(Path(value).expanduser()) if isinstance(value, (str, Path)) and str(value).startswith("~") else value


class _Section(BaseModel):
    # Unknown keys are almost always typos (``train.learning_rate``): refuse them. So is an inf or nan (``train.lr=.inf``).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DemoDataSettings(_Section):  # the embedded synthetic dataset (`vidray demo-data`)
    classes: int = Field(8, ge=2, le=12)
    videos_per_class: int = Field(12, ge=3)
    seed: int = 0


# One value where a key takes a list is a list of one: ``tune.lr=1e-4`` is the grid ``[1e-4]`` (pydantic refused it).
OneOrMany = BeforeValidator(lambda v: v if v is None or isinstance(v, (list, tuple, dict, BaseModel)) else [v])


class DataSettings(_Section):
    # Where raw videos come from: the built-in synthetic set, a ROOT/{train,val,test}/<Class>/<video> folder, or COIN.
    source: Literal["demo", "folder", "coin"] = "demo"
    videos_dir: Path = Path("data/demo/videos")
    manifest: Path = Path("data/demo/manifest.parquet")
    # Sharded Parquet output of ``vidray preprocess``; a local path or s3:// / gs:// URI.
    dataset_dir: str = "data/demo/dataset"
    # A folder without val/ (train/ and test/ only, as many datasets ship): this share of each class's train videos
    # becomes val, the same ones on every run (vidray.data.index.hold_out_val). 0: none, and training refuses the folder.
    val_fraction: float = Field(0.1, ge=0, lt=1)

    # COIN only (a demo or folder source is indexed without them: DataSettings refuses a duration filter there).
    annotations: Annotated[list[Path], OneOrMany] = Field(default_factory=list)
    taxonomy: Path | None = None
    min_duration: float | None = Field(None, ge=0)
    max_duration: float | None = Field(None, gt=0)
    # Classes: COIN's 12 domains, or its 180 tasks (what every published COIN number is on).
    coin_labels: Literal["domain", "task"] = "domain"

    # What the model eats per clip.
    frames: int = Field(16, ge=2)
    size: int = Field(112, ge=16)
    # What preprocessing stores per video: more frames and a larger square, so training can jitter in time and crop.
    # Unset: 32 frames of 128 px, or 2x frames and 8/7 x size where those are more (data.size=224 stores 256).
    stored_frames: int = Field(32, ge=2)
    stored_size: int = Field(128, ge=16)
    # Videos per Parquet shard, i.e. per preprocessing task: parallelism is at most the shard count.
    videos_per_shard: int = Field(8, ge=1)
    # Which library decodes (docs/benchmarks.md): pyav (least CPU per video), decord or torchcodec; in every shard id.
    decoder: DecoderName = DEFAULT_DECODER
    # cuda: torchcodec decodes on the GPU's NVDEC, each decode task taking a quarter of a GPU.
    decoder_device: DecodeDevice = "cpu"
    # How the clips are stored: raw uint8 (exact, 1.57 MB per 32x128² clip) or jpeg (each frame a
    # JPEG of jpeg_quality, decoded on the worker's CPU while it trains). Part of every shard id.
    store: StoreName = "raw"
    jpeg_quality: int = Field(DEFAULT_JPEG_QUALITY, ge=1, le=100)
    # Who hands the shards' decode tasks to the cluster (vidray/data/ray_decode.py): ray_data - Ray Data (the dashboard's
    # Data view follows it); ray_tasks - plain Ray tasks, without Ray Data's executor: the first task 1.3-1.9 s sooner, the
    # same videos/s (docs/benchmarks.md, "Preprocessing against its own decode work"). The same shards, byte for byte.
    dispatch: Dispatch = "ray_data"

    demo: DemoDataSettings = Field(default_factory=DemoDataSettings)

    _expand_home = field_validator("videos_dir", "manifest", "dataset_dir", "annotations", "taxonomy")(_home_expanded)

    @model_validator(mode="before")
    @classmethod
    def _stored_defaults(cls, data: Any) -> Any:
        for key, source, scale, least in (("stored_frames", "frames", 2, 32), ("stored_size", "size", 8 / 7, 128)):
            if isinstance(data, dict) and data.get(key) is None and isinstance(data.get(source), int):
                data = {**data, key: max(least, round(data[source] * scale))}
        return data

    @model_validator(mode="after")
    def _check(self) -> "DataSettings":
        if self.stored_frames < self.frames:
            raise ValueError(f"data.stored_frames ({self.stored_frames}) must be >= data.frames ({self.frames})")
        if self.stored_size < self.size:
            raise ValueError(f"data.stored_size ({self.stored_size}) must be >= data.size ({self.size})")
        if self.decoder_device == "cuda" and self.decoder != "torchcodec":
            raise ValueError(f"data.decoder_device=cuda needs data.decoder=torchcodec, not {self.decoder}")
        if self.min_duration is not None and self.max_duration is not None and self.min_duration > self.max_duration:
            raise ValueError("data.min_duration must be <= data.max_duration")
        if self.source != "coin" and (key := next((k for k in COIN_FILTERS if getattr(self, k) is not None), None)):
            raise ValueError(f"data.{key} applies to data.source=coin only ({self.source} keeps every video): remove it")
        return self


class ModelSettings(_Section):
    # Hub id or local directory of a VideoMAE checkpoint.
    name_or_path: str = "MCG-NJU/videomae-base-finetuned-kinetics"
    # ``scratch`` builds a randomly initialised model of ``size`` (demo, CPU tests).
    init: Literal["pretrained", "scratch"] = "pretrained"
    size: Literal["tiny", "small", "base"] = "base"
    # Scratch models only (a checkpoint fixes its own). patch_size: side in pixels, None = 16 (a 48 px clip in 16 px patches
    # is 3 x 3); tubelet_size: frames per token, None = 2 (longer: a token sees motion, which a small model learns faster).
    patch_size: int | None = Field(None, ge=1)
    tubelet_size: int | None = Field(None, ge=1)
    gradient_checkpointing: bool = False
    # Resize the pretrained sinusoid position table to the new token grid (a vidray checkpoint keeps its own at its grid).
    interpolate_pos_embed: bool = True
    dropout: float = Field(0.0, ge=0, lt=1)

    _expand_home = field_validator("name_or_path")(_home_expanded)

    @model_validator(mode="after")
    def _check(self) -> "ModelSettings":
        for key in ("patch_size", "tubelet_size"):
            if getattr(self, key) is not None and self.init == "pretrained":
                raise ValueError(f"model.{key} applies to init=scratch only: a pretrained checkpoint's {key} is part of "
                                 f"its weights; remove model.{key} or set model.init=scratch")
        return self


class TrainSettings(_Section):
    epochs: int = Field(15, ge=1)
    batch_size: int = Field(32, ge=1)  # global, across all workers
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: float = Field(0.0, ge=0)
    # Learning-rate schedule after the warm-up, per optimizer step (Hugging Face's get_scheduler).
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    layer_decay: float = Field(1.0, gt=0, le=1)  # 1.0 = off
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    mixup_alpha: float = Field(0.0, ge=0)  # 0 = off
    cutmix_alpha: float = Field(0.0, ge=0)  # 0 = off
    grad_accum_steps: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    eval_clips: int = Field(1, ge=1)
    # Random horizontal flips: they swap left/right motion, so only where no class depends on it (COIN: on; demo: off).
    hflip: bool = False
    seed: int = 42

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(0, ge=-1)
    prefetch_batches: int = Field(2, ge=0)
    # Threads per worker decoding a jpeg store's batch, a clip each (simplejpeg releases the GIL). null: int(cpus_per_worker)
    # on a GPU (its step leaves them free), 1 on CPU (its torch threads use them). Any count gives the same batches.
    decode_threads: int | None = Field(None, ge=1)
    # Where a compressed store's batches decode (vidray/train/decoding.py): cuda - on the worker's GPU, every sampled
    # frame of a batch in one nvJPEG call (torchcodec >= 0.16 or torchvision); cpu - in the worker's decode threads;
    # auto - cuda on a GPU worker with fewer than 6 decode threads (nvJPEG at 128² matches about six) where a library can
    # and agrees with the CPU decoder at start, else cpu. nvJPEG's pixels differ by a level or two: a resumed run keeps it.
    decode_device: Literal["auto", "cpu", "cuda"] = "auto"
    # Rows of vidray's seeded shuffle buffer (vidray/train/batches.py); 0 = every epoch in stored order.
    shuffle_buffer: int = Field(64, ge=0)
    # Where the decoded splits live (vidray/train/placement.py, ingest.py; the same batches either way, but for a sweep's
    # trial with a seed of its own: placement.build_datasets): never - re-read the shards every epoch (streamed);
    # always - read once into Ray's object store; device - also copy each worker's shard once into its device's memory
    # (on CPU, its share of the node's); auto - device where that shard fits a quarter of the device's memory, else
    # always where both splits fit a quarter of the object store, else never.
    cache_dataset: Literal["auto", "always", "never", "device"] = "auto"
    # torch.compile the model (train and eval graphs; the last eval batch padded to reuse its graph), at every (re)start.
    compile: bool = False
    # Step telemetry (step time, data wait, clips/s, TFLOP/s, MFU) on rank 0's console every this many steps; 0: per epoch.
    log_every_steps: int = Field(50, ge=0)
    # Write each epoch's checkpoint off the training thread (the ranks wait for rank 0's copy to host memory); false: inline.
    checkpoint_in_background: bool = True


class PretrainSettings(_Section):
    """Masked-autoencoder pretraining (``vidray pretrain``, vidray/pretrain/driver.py). How the run executes (workers, GPUs,
    failures, ingest, seed, gradient accumulation and clipping, flips) comes from ``train``; what it optimises from here."""

    epochs: int = Field(100, ge=1)
    batch_size: int = Field(32, ge=1)  # global, across all workers (train.num_workers x train.grad_accum_steps)
    # VideoMAE's AdamW (0.9, 0.95), wd 0.05, warm-up then cosine. lr is the absolute learning rate, never scaled by
    # batch_size: VideoMAE's base 1.5e-4 x batch/256 is 1.875e-5 at batch 32, 8x below this default; scale a copied base lr.
    lr: float = Field(1.5e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: float = Field(5.0, ge=0)
    # Share of each clip's spatial patch positions hidden at every time step (tube masking).
    mask_ratio: float = Field(0.9, gt=0, lt=1)
    # Reconstruct each patch normalised by its own mean and std (VideoMAE's default), not raw pixels.
    norm_pix_loss: bool = True
    decoder_depth: int = Field(4, ge=1)  # the decoder exists during pretraining only; VideoMAE-B's: 4 x 384 wide, 6 heads
    decoder_width: int = Field(384, ge=8)
    decoder_heads: int = Field(6, ge=1)
    # Splits pretrained on (labels are never read). Adding val or test is transductive: the encoder sees its test clips.
    splits: Annotated[list[Literal["train", "val", "test"]], OneOrMany] = Field(default_factory=lambda: ["train"])

    @model_validator(mode="after")
    def _check(self) -> "PretrainSettings":
        if not self.splits:
            raise ValueError("pretrain.splits is empty; list at least one split, e.g. [train]")
        if len(set(self.splits)) != len(self.splits):
            raise ValueError(f"pretrain.splits lists a split twice: {self.splits}")
        if self.decoder_width % self.decoder_heads:
            raise ValueError(f"pretrain.decoder_width ({self.decoder_width}) must be divisible by "
                             f"pretrain.decoder_heads ({self.decoder_heads})")
        return self


class SearchRange(_Section):
    low: float = Field(gt=0)
    high: float = Field(gt=0)

    @model_validator(mode="after")
    def _check(self) -> "SearchRange":
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        return self


# A swept value: a grid (a list, or one value) or a range ({low, high}), told apart first so that a bad value gets the
# error of the form it was written in, not one per form; _format_validation_error drops the form from the key.
GRID_OR_RANGE_TAGS = ("grid", "range")
GridOrRange = Annotated[
    Union[Annotated[SearchRange, Tag("range")], Annotated[list[float], OneOrMany, Tag("grid")]],
    Discriminator(lambda value: "range" if isinstance(value, (dict, SearchRange)) else "grid"),
]


class TuneSettings(_Section):
    mixup_alpha: Annotated[list[float], OneOrMany] = Field(default_factory=lambda: [0.0, 0.4])
    lr: GridOrRange = Field(default_factory=lambda: [5e-5])
    weight_decay: GridOrRange = Field(default_factory=lambda: [0.05])
    num_samples: int = Field(1, ge=1)  # repeats of the grid (random draws for ranges)
    metric: str = "val_macro_f1"
    mode: Literal["max", "min"] = "max"
    asha: bool = True
    grace_period: int = Field(1, ge=1)
    reduction_factor: int = Field(2, ge=2)
    max_concurrent_trials: int | None = Field(None, ge=1)  # None: derived from the cluster
    # Views of the best model's held-out test: clips (None: train.eval_clips) x crops (1: centre; 3: left, centre, right).
    test_clips: int | None = Field(None, ge=1)
    test_crops: Literal[1, 3] = 1

    @model_validator(mode="after")
    def _check(self) -> "TuneSettings":
        if any(a < 0 for a in self.mixup_alpha):
            raise ValueError("tune.mixup_alpha values must be >= 0")
        lrs, decays = (values if isinstance(values, list) else [] for values in (self.lr, self.weight_decay))
        if any(v <= 0 for v in lrs) or any(v < 0 for v in decays):  # bounded as train's: a trial checks only in its worker
            raise ValueError("tune.lr values must be > 0 and tune.weight_decay values >= 0")
        return self


class WandbSettings(_Section):
    enabled: bool = False
    project: str = "vidray"
    mode: Literal["offline", "online", "disabled"] = "offline"  # offline: written here, nothing sent; online: WANDB_API_KEY


def _local_folder(value: Any) -> Any:
    if isinstance(value, str) and "://" in value:
        raise ValueError(f"{value} is a URI, but reports are written on this machine: give a local folder, or null for "
                         "<storage_path>/<name>/reports (for a bucket storage_path, a local ~/ray_results/<scheme>/...)")
    return value


class RunSettings(_Section):
    name: str = "vidray"
    # Where runs and sweeps are kept: a local path or an s3:// / gs:// URI. The default is absolute, Ray's convention:
    # `ray job submit --working-dir .` runs the job in a copy of the repository that Ray deletes (relative lands there).
    storage_path: str = LOCAL_RESULTS
    # true: every node sees a local storage_path / data.dataset_dir at one path (NFS...); else refused on several nodes.
    shared_filesystem: bool = False
    # The sweep's results table, figures and best model: a local folder (a URI is refused: it became the folder s3:/b/r).
    # None: <storage_path>/<name>/reports; for a bucket, the run's local folder (vidray.storage.local_mirror).
    reports_dir: Annotated[Path | None, BeforeValidator(_local_folder)] = None
    wandb: WandbSettings = Field(default_factory=WandbSettings)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        # The run's folder is <storage_path>/<name>, which --restart deletes: a path (/, .., .) would point it elsewhere.
        if not name or name in (".", "..") or any(sep in name for sep in ("/", "\\", "\0")):
            raise ValueError(f"{name!r} is not a plain folder name (it names the run's folder under run.storage_path): "
                             "use letters, digits, '-', '_' or '.', without '/' and not '.' or '..', e.g. run.name=my_run")
        return name

    def reports_path(self) -> Path:
        """Absolute local directory of this run's reports (a bucket run's: beside its TensorBoard events)."""
        if self.reports_dir is not None:
            return Path(self.reports_dir).expanduser().resolve()
        return (local_mirror(self.storage_path, self.name) / "reports").resolve()


class VidrayConfig(_Section):
    data: DataSettings = Field(default_factory=DataSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    tune: TuneSettings = Field(default_factory=TuneSettings)
    pretrain: PretrainSettings = Field(default_factory=PretrainSettings)
    run: RunSettings = Field(default_factory=RunSettings)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=1e-4`` -> (["train", "lr"], 1e-4). Values are parsed as YAML, but a text field takes the text as typed
    where YAML reads another type (``run.name=2024-06-01``, a date: shell quotes never reach YAML)."""
    key, sep, raw = text.partition("=")
    path = key.split(".")
    if not sep or not key or any(not part for part in path):
        raise ConfigError(f"bad override {text!r}: expected dotted.key=value, e.g. train.lr=1e-4")
    field: Any = VidrayConfig  # the key's type: a field of plain text (a name, a path, a URI) takes the text as typed
    for part in path:
        field = getattr(getattr(field, "model_fields", {}).get(part), "annotation", None)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        if field not in (str, Path):
            raise ConfigError(f"bad value in override {text!r}: {yaml_problem(err)}") from None
        return path, raw.strip()
    # YAML 1.1 reads "1e-4" as a string; pydantic turns numeric strings into floats. Null, lists and maps stay refused.
    return path, raw.strip() if field in (str, Path) and isinstance(value, (int, float, date)) else value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node[part] = {} if node.get(part) is None else node[part]
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return raw


# Keys a continued run or sweep may change: where results go and are logged, where the data lives, telemetry, checkpointing, test views.
KEYS_FREE_ON_RESUME = (
    "run.wandb", "run.reports_dir", "run.shared_filesystem", "train.max_failures", "tune.test_clips", "tune.test_crops",
    "train.cache_dataset", "train.log_every_steps", "train.checkpoint_in_background", "train.decode_threads",
)


def config_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two ``model_dump(mode="json")`` configs."""
    if not prefix:  # a COIN duration filter saved with another source never applied (DataSettings refuses it now)
        old, new = ({**c, "data": {k: v for k, v in c.get("data", {}).items()
                                   if k not in COIN_FILTERS or c["data"].get("source") == "coin"}} for c in (old, new))
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"] if p not in GRID_OR_RANGE_TAGS) or "<root>"
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            msg = f"unknown key (check the spelling; {DEFAULT_CONFIG.name} lists every key: {DEFAULT_CONFIG})"
        elif item["type"] in ("string_type", "path_type") and not isinstance(item["input"], (str, list, dict, type(None))):
            msg += f" (YAML read {item['input']} as {type(item['input']).__name__}: put it in quotes)"
        lines.append(f"{key}: {msg}")
    return f"invalid config {source}: " + "; ".join(lines)


# The embedded default (the demo), in the package: an installed `vidray` runs without a checkout (configs/demo.yaml links).
DEFAULT_CONFIG = Path(__file__).with_name("configs") / "demo.yaml"


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load refusing a key repeated in a mapping, at any depth: YAML keeps the last (a second train: hid the first)."""

    def construct_document(self, node: yaml.Node) -> Any:
        todo, walked = [("", node)], set()  # (dotted prefix, node); a node is walked once: an alias may hold its parent
        while todo:
            prefix, parent = todo.pop()
            walked.add(id(parent))
            lines: dict[str, Any] = {}
            sequence = enumerate(parent.value) if isinstance(parent, yaml.SequenceNode) else []
            pairs = parent.value if isinstance(parent, yaml.MappingNode) else sequence
            for key, value in pairs:
                name = f"{prefix}{getattr(key, 'value', key)}"
                if (first := lines.setdefault(name, key)) is not key:  # a sequence's key, an index, is never repeated
                    raise yaml.YAMLError(f"the key {name} is given twice, at lines {first.start_mark.line + 1} and "
                                         f"{key.start_mark.line + 1} (YAML would keep only the last): merge them")
                todo += [] if id(value) in walked else [(f"{name}.", value)]
        return super().construct_document(node)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> VidrayConfig:
    """Read YAML (or the schema's defaults when ``path`` is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    source, path = ("(defaults)", None) if path is None else (str(path), Path(path))
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file not found: {path} (pass --config with a YAML file, e.g. configs/coin12.yaml)")
        try:
            raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {yaml_problem(err)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    raw = apply_overrides(raw, overrides or [])
    try:
        return VidrayConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def require_file(path: Path | None, key: str, hint: str) -> Path:
    """Fail early, naming the config key, when an input path is missing."""
    if path is None:
        raise ConfigError(f"{key} is not set ({hint})")
    if not Path(path).exists():
        raise ConfigError(f"{key}: {path} does not exist ({hint})")
    return Path(path)
