"""Connecting to Ray: the cluster in RAY_ADDRESS (as under `ray job submit`),
or a fresh local one; the storage paths every node of it must reach; what
it can give one training run (checked before anything starts, since a run
Ray can never place just waits); and how a driver that talks to it stops on
Ctrl-C or SIGTERM (:func:`sigterm_as_ctrl_c`, :func:`interrupted_by_signal`)."""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import socket
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, NamedTuple

import ray

from vidray.compat import quiet_worker_pool_warning, started_cluster_address
from vidray.config import TrainSettings, VidrayConfig
from vidray.errors import Interrupted, UserError
from vidray.storage import check_storage_for_cluster

# Where a local cluster that vidray starts listens: loopback only (its dashboard, with the Jobs API
# that runs any code it is sent, is on 127.0.0.1 too). Not 127.0.0.1 itself: Ray rewrites that to
# the host's outward IP (Ray's resolve_ip_for_localhost) and leaves the rest of
# 127.0.0.0/8 alone. tests/test_install.py checks a fresh cluster's node address.
LOOPBACK_IP = "127.0.0.2"

# Ray's workers take ports from 10002-19999 (its default worker port range, which each raylet hands out).
QUIET_PORTS_START = 20000


def quiet_ports() -> range:
    """Ports no bind to port 0 is given: from above Ray's worker ports to the kernel's ephemeral range, which is
    where every such bind lands (Ray's daemons and workers bind so all the time). Empty where that range starts
    lower."""
    try:
        ephemeral_start = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_start = 32768  # Linux's default; macOS's starts at 49152
    return range(QUIET_PORTS_START, max(ephemeral_start, QUIET_PORTS_START))


def free_port(besides: Collection[int] = ()) -> int:
    """A loopback port nothing holds, for a Ray server of a local cluster that cannot bind port 0 itself: a
    quiet one (above), which no other program's bind to port 0 takes in the seconds before that server binds
    it (vidray.local_cluster says what such a bind did to a cluster); else one the kernel picks. Not one of
    ``besides``: ports picked for the same start, not bound yet."""
    ports = quiet_ports()
    # Not the module's generator, which training seeds: processes seeded alike would try the same ports.
    for port in random.SystemRandom().sample(ports, min(len(ports), 100)):
        if port in besides:
            continue
        try:
            for host in ("127.0.0.1", LOOPBACK_IP):  # a server on either, or on every address, holds it
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    while True:
        with socket.socket() as s:
            s.bind(("0.0.0.0", 0))  # every address: a port the kernel gives so is held on none
            if (port := s.getsockname()[1]) not in besides:
                return port


# What Ray Data needs beside a run's workers to stream the shards every epoch (one
# read task). A run whose splits are cached in the object store needs none after its start.
DATA_CPUS = 1


def _drop_progress_bars_disabled(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Progress bars disabled")


def _drop_ignored_block_errors(record: logging.LogRecord) -> bool:
    # Ray Data's traceback (25-odd lines) for each block it drops under max_errored_blocks=-1, which vidray sets
    # where it recovers lost blocks itself (a decoder that kills its worker) and says so in its own line.
    return "Ignoring this exception with remaining max_errored_blocks" not in record.getMessage()


def _drop_tunes_restore_hint(record: logging.LogRecord) -> bool:
    # Tune's line after Ctrl-C, "Resume experiment with: Tuner.restore(path=..., trainable=...)": vidray's own
    # line follows (vidray.tune.sweep) and says to run the same command, not to call Tune's Python API.
    return "Tuner.restore(" not in record.getMessage()


def console_settings(verbose: bool) -> dict[str, Any]:
    """One console for every command: vidray's lines only, or everything with ``verbose``.

    Sets this process's Ray Data logging and progress bars and Tune's restore hint, and returns the
    ``ray.init`` keywords (``logging_level``: Ray's own logger here, e.g. "Started a local Ray instance").
    By default the workers' output (Ray Train logs every report and checkpoint at INFO on every worker, Ray Data
    every dataset execution, Ray core its own warnings) stays in Ray's log files and the dashboard,
    not on the console; a failing run still shows its error here, raised by the call that failed.
    """
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = verbose
    ray_data = logging.getLogger("ray.data")
    # Ray Data's own INFO lines and progress bars in this process (preprocessing, dataset reads, prediction).
    ray_data.setLevel(logging.INFO if verbose else logging.WARNING)
    for handler in ray_data.handlers:  # handlers: the record comes from a child logger
        # ...and its warning that the bars are off, which is what was asked for.
        for drop in (_drop_progress_bars_disabled, _drop_ignored_block_errors):
            (handler.removeFilter if verbose else handler.addFilter)(drop)
    if not verbose:
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    tune_log = logging.getLogger("ray.tune.tune")  # Tune's tune.py, by its module's name
    (tune_log.removeFilter if verbose else tune_log.addFilter)(_drop_tunes_restore_hint)
    quiet_worker_pool_warning(not verbose)  # a sweep's zero-CPU actors set it off on small machines
    return {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}


def init_ray(*, verbose: bool = False, **local_kwargs) -> None:
    """Connect once, with the console of :func:`console_settings` (applied on every call: it is this
    process's logging), as Ray's own ``ray.init()`` does: to ``RAY_ADDRESS``, else to the cluster `ray start`
    left running on this machine, else to a new local cluster on :data:`LOOPBACK_IP`, which alone gets
    ``local_kwargs``."""
    settings = console_settings(verbose)
    if ray.is_initialized():
        return
    if address := os.environ.get("RAY_ADDRESS") or started_cluster_address():
        try:
            ray.init(address=address, **settings)
        except ConnectionError:
            # Ray's own hint for a dead head that `ray start` recorded is an INFO line, below the console's level.
            if os.environ.get("RAY_ADDRESS"):
                where, fix = "RAY_ADDRESS", "start that cluster, or unset RAY_ADDRESS for a local cluster of vidray's own"
            else:
                where = "the cluster `ray start` left on this machine, which is gone"
                fix = "run `ray stop` to forget it (vidray then starts a local cluster of its own), or `ray start --head` again"
            raise UserError(f"cannot reach the Ray cluster at {address} ({where}): {fix}") from None
        except ValueError:
            # Ray's refusal of an http(s):// address (client_builder._get_builder_from_address), a multi-line
            # message; its other ValueErrors (ray:// without ray[client], ...) are not this mistake.
            if not address.startswith(("http://", "https://")):
                raise
            raise UserError(
                f"RAY_ADDRESS={address} is a Ray dashboard's address (its Jobs API), which `ray job submit` uses; vidray "
                "connects to the cluster itself: unset RAY_ADDRESS (vidray then joins the cluster `ray start` left on this "
                "machine, or starts its own), or set it to the head's HOST:6379"
            ) from None
    else:
        ray.init(**settings, **{"_node_ip_address": LOOPBACK_IP, **local_kwargs})
    sigterm_as_ctrl_c()  # after ray.init, whose core worker installs a handler of its own


# ------------------------------------------------------------------ stopping a driver: Ctrl-C and SIGTERM

# What a stop signal's number looks like on the wakeup pipe of interrupted_by_signal (one byte each).
_STOP_SIGNAL_BYTES = frozenset({signal.SIGINT, signal.SIGTERM})


def _sigterm_handler(signum: int, frame: Any) -> None:
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):  # SIGINT ignored or left to the C default: end as Python's default would
        raise KeyboardInterrupt
    handler(signal.SIGINT, frame)


def sigterm_as_ctrl_c() -> None:
    """Handle SIGTERM (``kill``, ``timeout``, ``ray job stop``, Kubernetes and Slurm at the end of a job) as
    Ctrl-C: by whichever SIGINT handler is in place when it comes. Ray Tune's saves the sweep and stops
    its trials, Ray Train's asks the run to abort, and otherwise Python raises KeyboardInterrupt; the
    CLI then says "interrupted" in one line. Left to Ray, SIGTERM ended the driver at once (status 1), printing
    the C++ stack trace of Ray's failure-signal handler (20-odd lines). Main thread only."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm_handler)


@contextmanager
def interrupted_by_signal(continues: str) -> Iterator[None]:
    """Around a driver's blocking ``trainer.fit()``: when Ctrl-C or SIGTERM arrives within the block, the
    block ends in :class:`~vidray.errors.Interrupted` with ``continues`` (how to go on), whether ``fit()``
    raised or returned.

    Needed because Ray Train answers Ctrl-C itself: ``fit()`` registers its own SIGINT handler, which
    asks the run to abort, after which its ``ray.get`` raises ``SystemExit(1)`` with nothing on the
    console. The signal is seen on a pipe given to ``signal.set_wakeup_fd``, where the interpreter writes
    the number of every signal that has a Python handler, whichever handler that is. Main thread only.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    read_end, write_end = os.pipe()
    for end in (read_end, write_end):
        os.set_blocking(end, False)
    previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)

    def stop_signal_came() -> bool:
        try:
            return not _STOP_SIGNAL_BYTES.isdisjoint(os.read(read_end, 1024))
        except BlockingIOError:  # nothing written: no signal
            return False

    try:
        yield
    except (KeyboardInterrupt, SystemExit) as error:
        if isinstance(error, Interrupted) or not stop_signal_came():
            raise
        raise Interrupted(continues) from None
    else:
        if stop_signal_came():
            raise Interrupted(continues)
    finally:
        signal.set_wakeup_fd(previous)
        os.close(read_end)
        os.close(write_end)


def shared_storage_paths(cfg: VidrayConfig) -> tuple[str, str]:
    """(run.storage_path, data.dataset_dir) as Ray should get them, after init_ray().

    Local paths come back absolute; on a multi-node cluster a node-local path
    is refused with a UserError naming the key (see check_storage_for_cluster).
    """
    shared = cfg.run.shared_filesystem
    storage_path = check_storage_for_cluster(cfg.run.storage_path, "run.storage_path", shared_filesystem=shared)
    dataset_dir = check_storage_for_cluster(cfg.data.dataset_dir, "data.dataset_dir", shared_filesystem=shared)
    return storage_path, dataset_dir


def cluster_summary() -> dict:
    """Alive nodes and their total resources, for run summaries and benchmarks."""
    nodes = [node for node in ray.nodes() if node["Alive"]]
    totals: dict[str, float] = {}
    for node in nodes:
        for name in ("CPU", "GPU", "memory", "object_store_memory"):
            totals[name] = totals.get(name, 0.0) + node["Resources"].get(name, 0.0)
    return {"nodes": len(nodes), **totals}


class NodeShape(NamedTuple):
    """``count`` nodes with ``cpus`` CPUs and ``gpus`` GPUs each."""

    cpus: float
    gpus: float
    count: int = 1

    def workers(self, train: TrainSettings) -> int:
        """How many of a run's Ray Train workers one such node can host. Each worker is one bundle of Ray Train's
        placement group, ``train.cpus_per_worker`` CPUs plus, with ``train.use_gpu``, one GPU
        (ScalingConfig.resources_per_worker), and a bundle lives on a single node: the CPUs of a GPU
        worker must be on its GPU's node, and no worker spans two nodes' spare CPUs."""
        fit = math.floor(self.cpus / train.cpus_per_worker + 1e-9)  # 0.3 / 0.1 is 2.999...
        return min(fit, math.floor(self.gpus)) if train.use_gpu else fit

    @classmethod
    def of(cls, resources: dict[str, Any], count: int = 1) -> "NodeShape":
        """From a node's resources as Ray gives them (``ray.nodes()``, a launcher config's node type)."""
        return cls(float(resources.get("CPU", 0)), float(resources.get("GPU", 0)), count)

    def describe(self) -> str:
        gpus = f" and {self.gpus:g} GPU{'s' if self.gpus != 1 else ''}" if self.gpus else ""
        return f"{self.count} x {self.cpus:g} CPUs{gpus}"


@dataclass(frozen=True)
class Capacity:
    """What the cluster can offer runs' placement groups: its nodes by shape, and where that was read.

    On an autoscaling cluster: its head first, then each node type as many times as it may be added, and
    ``max_worker_nodes``, Ray's global max_workers, which caps the sum of those worker nodes (the head aside).
    Each total is then the most that a set of nodes within the cap reaches: an upper bound that can be met,
    not the sum over every type, which may never all run at once."""

    nodes: tuple[NodeShape, ...]
    source: str  # for messages: "the Ray cluster" or the autoscaler's node types
    max_worker_nodes: int | None = None  # None: every node counts (a live cluster)

    @property
    def capped(self) -> bool:
        """Whether the cap leaves out some of the worker nodes the types allow."""
        cap = self.max_worker_nodes
        return cap is not None and sum(node.count for node in self.nodes[1:]) > cap

    def _most(self, value: Callable[[NodeShape], float]) -> float:
        """The largest sum of ``value`` (per node) over nodes that can run at once: the head and the
        ``max_worker_nodes`` worker nodes of largest value (each costs one against the cap, so that is best)."""
        if self.max_worker_nodes is None:
            return sum(node.count * value(node) for node in self.nodes)
        head, *workers = self.nodes
        total, left = head.count * value(head), self.max_worker_nodes
        for node in sorted(workers, key=value, reverse=True):
            taken = min(node.count, left)
            total, left = total + taken * value(node), left - taken
        return total

    def within_cap(self) -> str:
        """For a message about a total: what limits it, when the cap does."""
        return f" within max_workers={self.max_worker_nodes} worker nodes" if self.capped else ""

    @property
    def node_cpus(self) -> float:
        return max((node.cpus for node in self.nodes), default=0.0)

    @property
    def node_gpus(self) -> float:
        return max((node.gpus for node in self.nodes), default=0.0)

    @property
    def total_cpus(self) -> float:
        return self._most(lambda node: node.cpus)

    @property
    def total_gpus(self) -> float:
        return self._most(lambda node: node.gpus)

    def gpu_node_cpus(self) -> list[float]:
        """The CPU counts of the nodes that can host a GPU worker, smallest first."""
        return sorted({node.cpus for node in self.nodes if node.gpus >= 1})

    def workers_fit(self, train: TrainSettings) -> int:
        """How many of ``train``'s workers the cluster can host at once, node by node (:meth:`NodeShape.workers`)."""
        return int(self._most(lambda node: node.workers(train)))

    def describe(self) -> str:
        """Its nodes as "3 x 4 CPUs, 12 x 8 CPUs and 1 GPU": alike nodes as one (a message stays one short line
        on a large cluster), CPU-only ones first; under a cap that leaves some out, the head and then "plus at
        most 2 worker nodes of: ..."."""
        nodes, cap = (self.nodes[1:], self.max_worker_nodes) if self.capped else (self.nodes, None)
        counts: Counter[tuple[float, float]] = Counter()
        for node in nodes:
            counts[node.gpus, node.cpus] += node.count
        shapes = ", ".join(  # under the cap, each shape as many times as may run at once
            NodeShape(cpus, gpus, count if cap is None else min(count, cap)).describe()
            for (gpus, cpus), count in sorted(counts.items())
        )
        return shapes if cap is None else f"{self.nodes[0].describe()} plus at most {cap} worker nodes of: {shapes}"


def _autoscaling_capacity(path: Path = Path("~/ray_bootstrap_config.yaml")) -> Capacity | None:
    """On a `ray up` cluster, the most its node types can add up to (live nodes undercount it).

    None when there is no cluster-launcher config, no head_node_type among its types, or a node type leaves
    its resources to auto-detection (then nothing certain can be said). As Ray's autoscaler counts them:
    the head, plus worker nodes of each type up to its own max_workers (the head's type too, which
    defaults to 0 there), and never more than the global max_workers worker nodes in all (the head not
    among them): the Capacity's ``max_worker_nodes``.
    """
    import yaml

    path = path.expanduser()
    if not path.is_file():
        return None
    config = yaml.safe_load(path.read_text()) or {}
    node_types = config.get("available_node_types") or {}
    if not node_types or any("resources" not in t for t in node_types.values()):
        return None
    cap = int(config.get("max_workers", 10**6))
    head = config.get("head_node_type")
    if head not in node_types:
        return None
    nodes = [NodeShape.of(node_types[head]["resources"])]
    for name, node_type in node_types.items():
        count = min(int(node_type.get("max_workers", 0 if name == head else cap)), cap)
        if count > 0:
            nodes.append(NodeShape.of(node_type["resources"], count))
    return Capacity(tuple(nodes), f"the autoscaler's node types ({path})", max_worker_nodes=cap)


def cluster_capacity() -> Capacity:
    autoscaling = _autoscaling_capacity()
    if autoscaling is not None:
        return autoscaling
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    return Capacity(tuple(NodeShape.of(n) for n in nodes), "the Ray cluster")


def check_run_resources(train: TrainSettings, capacity: Capacity, data_cpus: int = DATA_CPUS) -> None:
    """Refuse a run whose Ray Train workers could never all be placed, or never be fed (it would wait forever:
    Ray Train V2 retries a worker group that never starts without end).

    ``data_cpus``: CPUs Ray Data needs beside the workers: :data:`DATA_CPUS` when
    the shards are streamed every epoch, 0 when the splits are cached.
    """
    where = capacity.source
    if train.use_gpu and capacity.total_gpus == 0:
        raise UserError(f"train.use_gpu=true but {where} has no GPUs; set train.use_gpu=false or add GPU nodes")
    if train.cpus_per_worker > capacity.node_cpus:
        raise UserError(
            f"train.cpus_per_worker={train.cpus_per_worker:g} but the largest node of {where} has "
            f"{capacity.node_cpus:g} CPUs; lower train.cpus_per_worker"
        )
    gpu_node_cpus = capacity.gpu_node_cpus()
    if train.use_gpu and gpu_node_cpus and train.cpus_per_worker > gpu_node_cpus[-1]:
        raise UserError(
            f"train.use_gpu=true with train.cpus_per_worker={train.cpus_per_worker:g}: no GPU node of {where} has "
            f"{train.cpus_per_worker:g} CPUs (its GPU nodes have {' or '.join(f'{c:g}' for c in gpu_node_cpus)}); "
            "lower train.cpus_per_worker"
        )
    needed_cpus = train.num_workers * train.cpus_per_worker + data_cpus
    if needed_cpus > capacity.total_cpus:
        data = f" plus {data_cpus} for Ray Data to stream the shards" if data_cpus else ""
        raise UserError(
            f"one run needs train.num_workers x train.cpus_per_worker = {train.num_workers} x "
            f"{train.cpus_per_worker:g} CPUs{data}, but {where} has {capacity.total_cpus:g}{capacity.within_cap()}; "
            "lower train.num_workers or train.cpus_per_worker"
        )
    if train.use_gpu and train.num_workers > capacity.total_gpus:
        raise UserError(
            f"train.num_workers={train.num_workers} GPU workers but {where} has {capacity.total_gpus:g} GPUs"
            f"{capacity.within_cap()}; "
            "lower train.num_workers"
        )
    if (fit := capacity.workers_fit(train)) < train.num_workers:
        # Enough CPUs in all, but split over nodes so that fewer whole workers fit (3 nodes of 3 CPUs hold
        # 3 workers of 2 CPUs, not 4).
        gpu = " and a GPU" if train.use_gpu else ""
        raise UserError(
            f"one run needs train.num_workers={train.num_workers} workers, each with train.cpus_per_worker="
            f"{train.cpus_per_worker:g} CPUs{gpu} on one node, but the nodes of {where} hold only {fit} of them "
            f"({capacity.describe()}); lower train.num_workers or train.cpus_per_worker"
        )


def derive_max_concurrent_trials(train: TrainSettings, capacity: Capacity, data_cpus: int = DATA_CPUS) -> int:
    """How many trials' worker groups fit side by side; Tune would otherwise start every trial at once.

    Ray Train starts a run only when all its workers can be placed, so extra
    trials would just sit in Tune waiting for resources. Counted node by node, as
    :func:`check_run_resources` does (GPUs included); ``data_cpus`` stay
    free for Ray Data's read tasks when the trials stream their data.
    """
    per_trial_cpus = train.num_workers * train.cpus_per_worker
    fit = math.floor((capacity.total_cpus - data_cpus) / per_trial_cpus)
    fit = min(fit, capacity.workers_fit(train) // train.num_workers)
    return max(1, fit)
