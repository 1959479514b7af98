"""Local paths and s3:// / gs:// URIs through pyarrow filesystems, videos at http(s):// URLs to predict,
local scratch folders that a killed process does not leave behind, and the check that a path is reachable
from every node of a multi-node Ray cluster."""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import posixpath
import re
import shutil
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from vidray.errors import UserError

if TYPE_CHECKING:
    import pyarrow.fs as pafs

# Filesystems mounted over the network, so every node can mount them at the same
# path. FUSE mounts of object stores (s3fs, gcsfuse, mountpoint-s3) are left out
# on purpose: give vidray the s3:// or gs:// URI instead, pyarrow reads it directly.
NETWORK_FILESYSTEMS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "lustre", "ceph", "glusterfs", "fuse.glusterfs", "gpfs", "beegfs"}
)


# Seconds a download of one video may wait on its server for a byte before the video is rejected.
DOWNLOAD_TIMEOUT_S = 60.0
# What may stand unencoded in a URI's path (RFC 3986's pchar, besides letters, digits and -._~), as pyarrow and web
# servers read it: a key or URL path is percent-encoded but for these, so a name that opened before keeps its row's name.
_RAW_IN_URI_PATH = "/!$&'()*+,;=:@"


def is_uri(path: str) -> bool:
    return "://" in str(path)


def is_web_url(path: str) -> bool:
    """An http(s):// URL: a video a web server holds (what transformers' pipeline also takes), read by
    downloading it (:func:`local_file`). Not a filesystem: it cannot be listed or written."""
    return str(path).split("://", 1)[0].lower() in ("http", "https") and is_uri(path)


def open_filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI such as s3://bucket/key."""
    # pyarrow here, not at module level: vidray.config imports this module (LOCAL_RESULTS, local_mirror), and the
    # CLI's --help and argument errors need not wait for pyarrow (about 0.1 s).
    import pyarrow as pa
    import pyarrow.fs as pafs

    path = str(path)
    if is_uri(path):
        try:
            return pafs.FileSystem.from_uri(path)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise UserError(
                f"{path}: not a folder or storage vidray can read or write ({err}); give a local path or an "
                "s3://, gs:// or hdfs:// URI (http(s):// URLs are read only as videos to predict)"
            ) from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))  # as resolve_path reads it


# ------------------------------------------------------------------ local scratch folders
# A checkpoint is staged in a local folder before Ray uploads it, and a Ray worker is often ended by
# SIGKILL (a lost node, a dead driver, the OOM killer), which runs no cleanup: each such folder would stay
# in /tmp, a whole checkpoint (GBs for ViT-B with its optimizer state) per crash of a long run. So each
# folder is named after its host and process, and whoever makes the next one removes those of this host
# whose process is gone. The host in the name keeps containers that share /tmp but not process ids apart.
_SCRATCH = re.compile(r"^vidray-(?P<kind>[a-z]+)-(?P<host>.+)-(?P<pid>\d+)-[^-]+$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def remove_orphaned_scratch(root: str | None = None) -> list[str]:
    """Remove the scratch folders (:func:`scratch_dir`) in ``root`` (default: the temporary directory)
    of this host whose process has ended; the paths removed."""
    root = root or tempfile.gettempdir()
    host, removed = _host(), []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        match = _SCRATCH.match(entry.name)
        if match and match["host"] == host and not _alive(int(match["pid"])) and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)  # another user's stays: not ours to remove
            if not os.path.lexists(entry.path):
                removed.append(entry.path)
    return removed


def scratch_dir(kind: str) -> str:
    """A new local folder for this process's temporary files of ``kind`` (``ckpt``, ``fetch``, ...),
    which its user removes; if this process dies first, the next call on this host removes it."""
    if not kind.isalpha() or not kind.islower():
        raise ValueError(f"scratch kind {kind!r}: lower-case letters only")
    remove_orphaned_scratch()
    return tempfile.mkdtemp(prefix=f"vidray-{kind}-{_host()}-{os.getpid()}-")


@contextlib.contextmanager
def scratch(kind: str) -> Iterator[str]:
    """:func:`scratch_dir`, removed when the block ends."""
    path = scratch_dir(kind)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class DownloadError(UserError):
    """A video at an http(s):// URL, or an s3:// / gs:// object, that could not be fetched; ``missing``: the server
    says it is not there (404, 410), else it failed or did not answer. Its message is the reason, without the URL."""

    def __init__(self, reason: str, missing: bool):
        super().__init__(reason)
        self.missing = missing


def _encoded_url(url: str) -> str:
    """``url`` with its path and query percent-encoded where they are not (a space, a non-ASCII letter: as a user types
    a URL), which urllib refuses to send; an ``%XX`` already there is kept, a lone ``%`` encoded."""
    parts = urllib.parse.urlsplit(url)
    path, query = (urllib.parse.quote(re.sub(r"%(?![0-9A-Fa-f]{2})", "%25", text), safe="%?" + _RAW_IN_URI_PATH)
                   for text in (parts.path, parts.query))  # fmt: skip
    return urllib.parse.urlunsplit(parts._replace(path=path, query=query))


def _download(url: str, to: str) -> None:
    try:
        request = urllib.request.Request(_encoded_url(url), headers={"User-Agent": "vidray"})  # some servers refuse urllib's own
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as src, open(to, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 * 2**20)
    except urllib.error.HTTPError as err:
        raise DownloadError(f"download failed: HTTP {err.code} {err.reason}", missing=err.code in (404, 410)) from None
    except (urllib.error.URLError, OSError) as err:  # refused, unknown host, timed out, cut off
        reason = getattr(err, "reason", None) or err
        raise DownloadError(f"download failed: {reason}", missing=False) from None
    except (http.client.HTTPException, ValueError) as err:  # a URL urllib cannot send (a bad port), a reply cut short
        raise DownloadError(f"download failed: {err}", missing=False) from None


@contextlib.contextmanager
def local_file(path: str) -> Iterator[str]:
    """A local path holding ``path``'s bytes: the path itself (``file://`` stripped), or for an object in
    s3:// / gs:// or a video at an http(s):// URL a temporary copy (decoders read local files), deleted
    afterwards.

    A missing object yields a path that does not exist, so the decoder rejects it as missing; a URL or another
    object that cannot be fetched raises :class:`DownloadError`."""
    local = local_part(str(path))
    if local is not None:
        yield local
        return
    web = is_web_url(path)
    try:
        fs, key = (None, urllib.parse.urlparse(path).path) if web else open_filesystem(path)
    except (UserError, OSError, ValueError) as err:  # ftp://, a bucket's region not found, http://[::1/...: this video's failure
        raise DownloadError(f"download failed: {err}", missing=False) from None
    suffix = os.path.splitext(key)[1]
    with scratch("fetch") as folder:
        copy = os.path.join(folder, "video" + suffix)
        if web:
            _download(path, copy)
        else:
            try:
                with fs.open_input_stream(key) as src, open(copy, "wb") as dst:
                    shutil.copyfileobj(src, dst, 8 * 2**20)
            except FileNotFoundError:
                copy = os.path.join(folder, "missing" + suffix)
            except OSError as err:  # access denied, a network error: this video's failure, not the run's
                raise DownloadError(f"download failed: {' '.join(str(err).split())}", missing=False) from None
        yield copy


@contextlib.contextmanager
def local_folder(path: str, files: tuple[str, ...] | None = None) -> Iterator[str]:
    """What ``from_pretrained`` can read for ``path``: the path itself where it is no URI (a local folder, a hub
    id), else a temporary copy of the folder at that URI (s3://, gs://: where `vidray pretrain` writes a bucket
    run's encoder; file:// too, as they are read), of ``files`` in it only when given, deleted afterwards.
    A folder or file that is not there, or cannot be read, raises pyarrow's OSError."""
    if not is_uri(path):
        yield str(path)
        return
    import pyarrow.fs as pafs  # here, as in open_filesystem

    fs, root = open_filesystem(path)
    with scratch("fetch") as folder:
        for name in files or ("",):
            target = os.path.join(folder, name) if name else folder
            pafs.copy_files(join_uri(root, name) if name else root, target, source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())  # fmt: skip
        yield folder


def read_json(uri: str) -> Any | None:
    """The JSON at ``uri``, or None when it is missing, being written or damaged; a :class:`UserError` naming it
    when the storage does not let it be read (access denied, a network error)."""
    return load_json(*open_filesystem(uri))


def load_json(fs: pafs.FileSystem, path: str) -> Any | None:
    """:func:`read_json` for a ``path`` inside a filesystem already open."""
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (FileNotFoundError, ValueError):
        return None
    except OSError as err:
        # Not "no such file": a bucket's access denied, a network error, NFS's ESTALE. Read as absent, a run lock
        # looked free (`--restart` then deleted a live run) and a marker was written again without what it held.
        raise UserError(f"{path}: cannot read it ({' '.join(str(err).split())}): check the storage's access "
                        "and network, then run again") from None


def json_text(value: Any) -> str:
    """``value`` as JSON that every parser reads (jq, JSON.parse): a NaN or infinite number (a diverged loss) is
    null, where json.dumps would write NaN, which is not JSON. Anything else JSON lacks is its str()."""

    def finite(v: Any) -> Any:
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(value), indent=2, default=str, allow_nan=False) + "\n"


def write_atomically(fs: pafs.FileSystem, path: str, write) -> None:
    """``write(temporary)`` writes the file under a dot-name beside ``path``, which is then moved over ``path``:
    a killed writer never leaves half a file there (and readers skip dot-files, so a half-written temporary
    never looks like data either)."""
    directory, name = path.rsplit("/", 1)
    tmp = f"{directory}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
    fs.create_dir(directory, recursive=True)
    try:
        write(tmp)
        fs.move(tmp, path)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise


def write_json(uri: str, value: Any) -> None:
    """Whole (:func:`write_atomically`): a run's marker is rewritten as the run goes (vidray/train/follow.py), and a
    driver killed mid-write must not leave it cut short."""
    fs, path = open_filesystem(uri)

    def write(tmp: str) -> None:
        with fs.open_output_stream(tmp) as f:
            f.write(json_text(value).encode())

    write_atomically(fs, path, write)


def join_uri(base: str, *parts: str) -> str:
    """``parts`` under ``base``, a local path or a URI; a URI's query (an S3-compatible store's
    ``?endpoint_override=...``) stays at its end, where pyarrow reads it."""
    base = str(base)
    if is_uri(base):
        base, mark, query = base.partition("?")
        return "/".join([base.rstrip("/"), *parts]) + mark + query
    return os.path.join(base, *parts)


def resolve_path(path: str) -> str:
    """URIs unchanged; local paths absolute with ``~`` expanded.

    Ray resolves a relative storage path in whichever process reads it, and
    workers do not run in the driver's directory, so Ray only ever gets
    absolute local paths.
    """
    path = str(path)
    if is_uri(path):
        return path
    return os.path.abspath(os.path.expanduser(path))


def listed_object_uri(folder_uri: str, listed: str) -> str:
    """The URI of an object that listing ``folder_uri`` gave as ``listed`` (pyarrow lists ``bucket/key``): with the
    folder's scheme and query options (an endpoint_override, a region), which reading the object needs as listing it
    did. Not its keys (:func:`without_credentials`): the URI is the video's name in every row, predictions.parquet
    and the console included; keys come from the environment (AWS_ACCESS_KEY_ID, ...), as pyarrow reads them.

    The key is percent-encoded, as pyarrow's FileSystem.from_uri decodes it: a raw space or non-ASCII letter made the
    URI unparsable (the object rejected as download_failed on every run), a raw ``?`` or ``#`` cut the key short (another
    object read). What pyarrow parses raw stays raw, so a name that opened before keeps its row's name."""
    parts = urllib.parse.urlsplit(folder_uri)
    key = urllib.parse.quote(listed, safe=_RAW_IN_URI_PATH)
    return without_credentials(f"{parts.scheme}://{key}{'?' + parts.query if parts.query else ''}")


def local_part(path: str) -> str | None:
    """The local path behind ``path``, or None when it names remote storage."""
    if path.startswith("file://"):
        return urllib.parse.unquote(path[len("file://") :])  # percent-encoded, as Path.as_uri() writes it
    return None if is_uri(path) else path


# Where a run on a bucket keeps the files that must be local files (:func:`local_mirror`), and the default
# run.storage_path: Ray's own folder for results, on the driver's machine.
LOCAL_RESULTS = "~/ray_results"


def local_mirror(location: str, *parts: str) -> Path:
    """The folder on this machine for the local files of the run at ``join_uri(location, *parts)``
    (a run's storage path and name, or its URI): TensorBoard events and wandb/ (they write local files)
    and a sweep's reports. A local path (``~`` expanded, or ``file://``, as :func:`local_part` reads it and
    the drivers give it to Ray) is its own folder, which ``--restart`` deletes with the run. Any other URI's is
    ``~/ray_results/<scheme>/<bucket or host>/<path...>``, e.g. ``~/ray_results/s3/my-bucket/team/runs/demo``
    for ``s3://my-bucket/team/runs`` and ``demo``: derived from the whole URI, so it is neither
    ``~/ray_results/demo`` (a local run of the same name, under the default storage path) nor the folder of
    a run of that name on another bucket or prefix. Its query (``?endpoint_override=...``) and any
    ``user:secret@`` before the host are left out (no credentials in a folder name), as are ``.`` and ``..``
    (the folder stays inside ``~/ray_results/<scheme>``)."""
    local = local_part(str(location))
    if local is not None:
        return Path(os.path.join(local, *parts)).expanduser()
    uri = urllib.parse.urlsplit(without_credentials(join_uri(str(location), *parts)))  # scheme lower-cased
    segments = [uri.scheme, uri.netloc, *posixpath.normpath("/" + uri.path).split("/")]
    return Path(LOCAL_RESULTS).expanduser().joinpath(*(s for s in segments if s not in ("", ".", "..")))


_SECRET_OPTION = re.compile(r"key|secret|token|password|credential", re.IGNORECASE)


def without_credentials(value: Any) -> Any:
    """``value`` with every URI in it (it may be a dict or list of them, as a run's config) stripped of what may be a
    secret: a ``user:secret@`` before the host (pyarrow reads S3 keys from there) and query options named like a
    key, secret, token or password. For what leaves the user's storage: an export meant to be shared."""
    if isinstance(value, dict):
        return {k: without_credentials(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_credentials(v) for v in value]
    if not isinstance(value, str) or not is_uri(value):
        return value
    parts = urllib.parse.urlsplit(value)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if not _SECRET_OPTION.search(k)]
    netloc = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, urllib.parse.urlencode(query), parts.fragment))


def mount_fstype(path: str, mounts_file: str = "/proc/mounts") -> str | None:
    """Filesystem type of the mount that holds ``path`` (None where /proc/mounts does not exist)."""
    try:
        with open(mounts_file) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best_mount, best_type = "", None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        # /proc/mounts escapes spaces and tabs in mount points as octal (\040).
        mount_point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best_mount):
            best_mount, best_type = mount_point, fields[2]
    return best_type


# Node label that marks a cluster as multi-node even while only its head is up:
# the cluster launcher configs (cluster.yaml) put it on the head, because an
# autoscaling cluster starts with the head alone and adds workers per job.
MULTI_NODE_LABEL = "vidray-multi-node"


def _why_multi_node() -> str | None:
    """Why the connected Ray cluster has (or will get) more than one node; None when it will not."""
    import ray

    if not ray.is_initialized():
        return None
    alive = [node for node in ray.nodes() if node["Alive"]]
    if len(alive) > 1:
        return f"has {len(alive)} nodes"
    if any(node.get("Labels", {}).get(MULTI_NODE_LABEL) == "true" for node in alive):
        return f"is labelled {MULTI_NODE_LABEL}=true (it autoscales)"
    return None


def check_storage_for_cluster(
    storage_path: str, key: str, *, shared_filesystem: bool = False, num_nodes: int | None = None
) -> str:
    """Return ``storage_path`` as Ray should get it, refusing node-local paths on multi-node clusters.

    Checkpoints and dataset shards are written by workers on every node and read
    back wherever the next worker lands (Ray Train needs shared storage since
    2.7), so on a cluster with more than one node a plain local path would
    scatter them over private disks. Accepted there: s3:// and gs:// URIs, paths
    on a network filesystem (NFS, Lustre, ...: see :data:`NETWORK_FILESYSTEMS`),
    and any local path when the user vouches for it with ``shared_filesystem``
    (``run.shared_filesystem: true``), e.g. a mount the driver cannot classify.

    ``num_nodes`` overrides the count read from the connected cluster; without it
    the cluster counts as multi-node when more than one node is alive or a node
    carries the :data:`MULTI_NODE_LABEL` label. ``key`` names the config key in the error.
    """
    local = local_part(str(storage_path))
    if local is None:
        return str(storage_path)
    resolved = resolve_path(local)
    if shared_filesystem:
        return resolved
    if num_nodes is None:
        reason = _why_multi_node()
    else:
        reason = f"has {num_nodes} nodes" if num_nodes > 1 else None
    if reason is None:
        return resolved
    fstype = mount_fstype(resolved)
    if fstype in NETWORK_FILESYSTEMS:
        return resolved
    raise UserError(
        f"{key}: {storage_path!r} is a node-local path ({fstype or 'unknown'} filesystem) but the Ray cluster "
        f"{reason}, so workers on other nodes cannot see it; use s3://bucket/path or gs://bucket/path, "
        f"or a path mounted at the same place on every node (NFS, EFS, Filestore) and "
        + ("pass --shared-filesystem" if key.startswith("--") else "set run.shared_filesystem=true")
    )
