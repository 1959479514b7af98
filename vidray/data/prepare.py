"""Config -> a ready dataset directory: generate, index and preprocess as needed.

``train`` and ``tune`` call :func:`prepare_dataset` first. Every step is
cheap when its output is already current, so calling it again costs little:

* ``demo``: generate the synthetic videos into ``data.videos_dir`` if that
  folder is absent or empty, index it when the manifest is older than the
  folder or indexed another one, preprocess (resumable, finished shards are reused).
* ``folder``: index ``data.videos_dir`` when the manifest is older than the
  last change to any file or folder in it (their ctime too: :func:`changed_ns`),
  indexed another folder (or COIN's videos: the manifest records what it indexed,
  :func:`indexed_elsewhere`), or was held out with another ``data.val_fraction``
  (a folder without val/ lends that share of its train videos to val), then preprocess.
* ``coin``: always re-index (reading the annotations is quick, and
  ``data.min_duration`` / ``data.max_duration`` may have changed; a video
  unchanged since the last index keeps its probe, an unchanged manifest
  reuses every shard), then preprocess.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from vidray.config import ConfigError, DataSettings, VidrayConfig, require_file
from vidray.data.coin import index_coin
from vidray.data.demo import (
    DEMO_CLASSES, DemoFolderTaken, demo_settings, drawn_with_seed, generate_demo_videos, record_demo_settings,
    recorded_demo_settings,
)  # fmt: skip
from vidray.data.index import changed_ns, held_out_fraction, index_folder, indexed_from, lent_to_val
from vidray.data.listing import is_hidden, is_video_file, walk_once
from vidray.data.preprocess import preprocess, refuse_node_local_output
from vidray.storage import resolve_path

FOLDER_HINT = "a folder laid out as ROOT/{train,val,test}/<Class>/<video>"
COIN_VIDEOS_HINT = "downloaded COIN videos as DIR/<recipe_type>/<youtube_id>.mp4 or DIR/<youtube_id>.mp4"


def _newest_change_ns(root: Path, manifest: Path) -> int:
    """When a video or folder in ``root`` last changed (:func:`changed_ns`), in linked folders too (a class folder
    linked from elsewhere is indexed: walk_once).

    Among files, only videos' own times count: a manifest kept in the folder (`--out /videos/manifest.parquet`) is
    not its data. Its folder changed when the manifest was written into it, after the listing began (the mtime
    the manifest carries): that folder counts from the manifest's ctime, the moment it was written, else such a
    manifest was stale as soon as it was written, and every run probed every video again."""
    own = manifest.parent.stat()
    written = manifest.stat().st_ctime_ns

    def folder_changed(stat: os.stat_result) -> int:
        changed = changed_ns(stat)
        return 0 if (stat.st_dev, stat.st_ino) == (own.st_dev, own.st_ino) and changed <= written else changed

    newest = folder_changed(root.stat())
    for directory, _, files in walk_once(root):
        newest = max(newest, folder_changed(os.stat(directory)))
        for name in files:
            if is_hidden(name) or not is_video_file(Path(name)):
                continue
            try:
                newest = max(newest, changed_ns(os.stat(os.path.join(directory, name))))
            except OSError:
                pass  # a dangling link; indexing will say what is wrong with it
    return newest


def _paths_outside(manifest: Path, videos_dir: Path) -> list[str]:
    """The manifest's video paths that are not below ``videos_dir`` (as given, or resolved)."""
    roots = {os.path.abspath(videos_dir), str(videos_dir.resolve())}
    paths = pq.read_table(manifest, columns=["path"]).column("path").to_pylist()
    return [p for p in paths if not any(p.startswith(os.path.join(root, "")) for root in roots)]


def indexed_elsewhere(manifest: Path, videos_dir: Path) -> str | None:
    """Why ``manifest`` is not the index of the folder ``videos_dir``, as the end of a sentence for the
    console ("was the index of /data/demo/videos"); None when it is, or there is no manifest.

    The demo and the folder source share a default manifest path, and a folder's files may be older than a
    manifest another one's index wrote (untarred footage keeps its mtimes): by mtimes alone, training would
    run on that other folder's videos and classes. The manifest records the folder it indexed
    (:func:`vidray.data.index.indexed_from`); one written before that is the folder's while all its videos
    are below it."""
    if not manifest.is_file():
        return None
    try:
        recorded = indexed_from(manifest)
        outside = _paths_outside(manifest, videos_dir) if recorded is None else []
    except (pa.ArrowException, OSError) as err:
        return f"was not a readable manifest ({type(err).__name__})"
    if recorded is None:
        return f"listed videos outside it ({outside[0]}, ...)" if outside else None
    source, root = recorded
    if source == "folder" and root == videos_dir.resolve():
        return None
    return f"was the index of {root}" if source == "folder" else f"was the index of the {source} videos in {root}"


def manifest_is_stale(manifest: Path, videos_dir: Path) -> bool:
    """Whether ``videos_dir`` must be indexed (again) into ``manifest``: there is none, it is not the folder's
    index (said on the console: :func:`indexed_elsewhere`), or it is older than the last change to a file or
    folder in ``videos_dir`` (:func:`_newest_change_ns`). Its mtime is when its listing began
    (:func:`vidray.data.index.index_folder`), so a video copied in while the folder was probed counts as a change."""
    if not manifest.is_file():
        return True
    elsewhere = indexed_elsewhere(manifest, videos_dir)
    if elsewhere is not None:
        print(f"vidray index: indexing {videos_dir} into {manifest}, which {elsewhere}", file=sys.stderr)
        return True
    return manifest.stat().st_mtime_ns < _newest_change_ns(videos_dir, manifest)


def folder_manifest_is_stale(data: DataSettings) -> bool:
    """Whether ``data.videos_dir`` must be indexed again: :func:`manifest_is_stale`, or a folder without val/
    lent its train videos to val with another ``data.val_fraction``."""
    held_out = lent_to_val(data.videos_dir, data.val_fraction)
    return manifest_is_stale(data.manifest, data.videos_dir) or held_out_fraction(data.manifest) != held_out


def ensure_demo_videos(data: DataSettings) -> None:
    """The demo's videos in ``data.videos_dir``: generated when the folder is absent or empty, otherwise
    checked to be the set ``data.demo`` describes."""
    videos_dir, demo = data.videos_dir, data.demo
    if not videos_dir.exists() or (videos_dir.is_dir() and not any(videos_dir.iterdir())):
        try:
            generate_demo_videos(videos_dir, classes=demo.classes, videos_per_class=demo.videos_per_class, seed=demo.seed)
            return
        except DemoFolderTaken:
            pass  # another run started together with this one wrote them first: checked below, like any set
    # Existing videos must be the set data.demo describes; silently training on
    # another set (fewer classes, say) would be worse than stopping.
    classes = sorted({p.parent.name for p in videos_dir.glob("*/*/*.mp4")})
    count = len(list(videos_dir.glob("*/*/*.mp4")))
    wanted = sorted(DEMO_CLASSES[: demo.classes])
    if classes != wanted or count != demo.classes * demo.videos_per_class:
        raise ConfigError(
            f"data.videos_dir {videos_dir} holds {count} videos of {len(classes)} classes, but data.demo asks for "
            f"{demo.classes} classes x {demo.videos_per_class} videos: delete the folder to regenerate it, "
            "or set data.videos_dir to an empty path"
        )
    _check_demo_settings(data)


def _check_demo_settings(data: DataSettings) -> None:
    """The set in ``data.videos_dir`` (its classes and counts checked) must be the one ``data.demo`` draws: the
    settings it was made with are recorded beside it (vidray.data.demo.settings_file). A set made before they were
    recorded is this seed's when its videos' frame sizes, rates and lengths are the seed's draws
    (vidray.data.demo.drawn_with_seed); it gets its record then. Another seed's set is refused either way: the
    run would train on it while its saved config names this seed."""
    videos_dir, demo = data.videos_dir, data.demo
    wanted = demo_settings(demo.classes, demo.videos_per_class, demo.seed)
    recorded = recorded_demo_settings(videos_dir)
    fix = "delete the folder to regenerate it, or set data.videos_dir to another (empty) path"
    if recorded is None:
        if not drawn_with_seed(videos_dir, demo.classes, demo.videos_per_class, demo.seed):
            raise ConfigError(f"data.videos_dir {videos_dir} holds demo videos that data.demo.seed={demo.seed} does not "
                              f"draw (another seed's, or an earlier vidray's generator: made before the folder recorded its settings): {fix}")  # fmt: skip
        record_demo_settings(videos_dir, wanted)
        return
    for key, value in wanted.items():
        if recorded.get(key) != value:
            what = ("another version of vidray's demo generator" if key == "generator"
                    else f"data.demo.{key}={recorded.get(key)!r}, but the config asks for {value!r}")  # fmt: skip
            raise ConfigError(f"data.videos_dir {videos_dir} holds the demo videos of {what}: {fix}")


def prepare_dataset(cfg: VidrayConfig, verbose: bool = False, retry_crashed: bool = False) -> str:
    """Make ``cfg.data.dataset_dir`` current for ``cfg.data`` and return it (``verbose``: Ray's own lines
    on the console while it preprocesses, vidray.cluster.console_settings; ``retry_crashed``: see
    :func:`vidray.data.preprocess.preprocess`)."""
    data = cfg.data
    # Connected to a cluster already (`vidray prepare`, train, tune): refused before generating or indexing.
    refuse_node_local_output(resolve_path(data.dataset_dir), "data.dataset_dir", cfg.run.shared_filesystem)
    if data.source == "demo":
        ensure_demo_videos(data)
        if manifest_is_stale(data.manifest, data.videos_dir):
            index_folder(data.videos_dir, data.manifest)
    elif data.source == "folder":
        require_file(data.videos_dir, "data.videos_dir", FOLDER_HINT)
        if folder_manifest_is_stale(data):
            summary = index_folder(data.videos_dir, data.manifest, val_fraction=data.val_fraction)
            if summary["val_held_out_of_train"]:
                print(f"vidray index: {data.videos_dir} has no val/: {summary['val_held_out_of_train']} of its train videos "
                      f"are val (data.val_fraction={data.val_fraction}, the same ones on every run)", file=sys.stderr)  # fmt: skip
    else:
        if not data.annotations:
            raise ConfigError("data.annotations is not set (list COIN annotation JSON files, e.g. [COIN.json])")
        for index, annotation_file in enumerate(data.annotations):
            require_file(annotation_file, f"data.annotations[{index}]", "a COIN annotation JSON file")
        taxonomy = require_file(data.taxonomy, "data.taxonomy", "COIN's taxonomy_domains.csv")
        require_file(data.videos_dir, "data.videos_dir", COIN_VIDEOS_HINT)
        index_coin(
            annotations=list(data.annotations),
            taxonomy=taxonomy,
            videos_dir=data.videos_dir,
            out=data.manifest,
            min_duration=data.min_duration,
            max_duration=data.max_duration,
            labels=data.coin_labels,
        )
    preprocess(
        data.manifest,
        data.dataset_dir,
        frames=data.frames,
        size=data.size,
        stored_frames=data.stored_frames,
        stored_size=data.stored_size,
        videos_per_shard=data.videos_per_shard,
        decoder=data.decoder,
        decoder_device=data.decoder_device,
        store=data.store,
        jpeg_quality=data.jpeg_quality,
        dispatch=data.dispatch,
        verbose=verbose,
        retry_crashed=retry_crashed,
        shared_filesystem=cfg.run.shared_filesystem,
        out_key="data.dataset_dir",
    )
    return data.dataset_dir
