"""The cluster launcher configs, checked offline with Ray's own code.

`ray up` first runs prepare_config (merge with the provider's defaults.yaml,
merge setup commands, validate the docker section, fill per-type worker
limits) and validate_config (ray-schema.json plus cross-field checks); then
it contacts the cloud. We run exactly those offline steps, parse the result
the way the head's autoscaler (v2, the `ray up` default) does, and ask Ray's
v2 scheduler which nodes it would launch for vidray's workloads.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig
from ray.autoscaler.v2.scheduler import ResourceDemandScheduler, SchedulingRequest
from ray.autoscaler.v2.schema import AutoscalerInstance
from ray.autoscaler.v2.utils import ResourceRequestUtil
from ray.core.generated.autoscaler_pb2 import GangResourceRequest
from ray.core.generated.instance_manager_pb2 import Instance, NodeKind

from conftest import bootstrap_config
from vidray.cluster import _autoscaling_capacity, check_run_resources, derive_max_concurrent_trials
from vidray.config import TrainSettings, load_config
from vidray.errors import UserError
from vidray.storage import MULTI_NODE_LABEL

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"aws": REPO / "cluster.yaml", "gcp": REPO / "configs" / "cluster_gcp.yaml"}


@pytest.fixture(params=sorted(CONFIGS), scope="module")
def launcher(request):
    """(provider, raw YAML, the config as `ray up` prepares it before contacting the cloud)."""
    raw = yaml.safe_load(CONFIGS[request.param].read_text())
    return request.param, raw, prepare_config(copy.deepcopy(raw))


@pytest.fixture(scope="module")
def autoscaling(launcher):
    _, raw, _ = launcher
    # What the head's autoscaler builds from ~/ray_bootstrap_config.yaml (it
    # runs prepare_config + validate_config again). The content hash of
    # file_mounts is skipped: it only detects changes between `ray up` calls.
    return AutoscalingConfig(copy.deepcopy(raw), skip_content_hash=True)


def test_passes_ray_schema_and_cross_field_validation(launcher):
    provider, raw, prepared = launcher
    validate_config(prepared)
    assert prepared["provider"]["type"] == provider
    assert raw["head_node_type"] in raw["available_node_types"]
    # Every node type declares its resources: GCP cannot detect them, and on
    # AWS the declared ones are what the autoscaler plans with before boto3 runs.
    for node_type in raw["available_node_types"].values():
        assert node_type["resources"].get("CPU") is not None


def test_head_runs_no_training_and_marks_the_cluster_multi_node(launcher):
    _, raw, prepared = launcher
    head = prepared["available_node_types"][raw["head_node_type"]]
    assert "GPU" not in head["resources"] and head["max_workers"] == 0
    assert head["labels"][MULTI_NODE_LABEL] == "true"


def test_gpu_types_have_one_gpu_and_a_spot_and_on_demand_variant(launcher):
    provider, raw, _ = launcher
    types = raw["available_node_types"]
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU")}
    assert set(gpu_types) == {"gpu_spot", "gpu_ondemand"}
    for node_type in gpu_types.values():
        assert node_type["resources"]["GPU"] == 1
        assert any(key.startswith("accelerator_type:") for key in node_type["resources"])
    spot, ondemand = types["gpu_spot"]["node_config"], types["gpu_ondemand"]["node_config"]
    if provider == "aws":
        assert spot["InstanceMarketOptions"]["MarketType"] == "spot"
        assert "InstanceMarketOptions" not in ondemand
        assert spot["InstanceType"] == ondemand["InstanceType"]
    else:
        assert spot["scheduling"]["provisioningModel"] == "SPOT"
        assert ondemand["scheduling"].get("provisioningModel", "STANDARD") == "STANDARD"
        # GPU VMs cannot live-migrate: GCE rejects them unless host maintenance terminates.
        assert spot["scheduling"]["onHostMaintenance"] == ondemand["scheduling"]["onHostMaintenance"] == "TERMINATE"
        assert spot["machineType"] == ondemand["machineType"]
    assert types["gpu_spot"]["priority"] > types["gpu_ondemand"]["priority"]


def test_workers_get_cloud_storage_credentials(launcher):
    provider, raw, _ = launcher
    workers = {n: t for n, t in raw["available_node_types"].items() if n != raw["head_node_type"]}
    for name, node_type in workers.items():
        node_config = node_type["node_config"]
        if provider == "aws":
            # Ray only gives the head an instance profile; workers write checkpoints to S3 themselves.
            assert node_config["IamInstanceProfile"]["Name"], name
        else:
            (account,) = node_config["serviceAccounts"]
            project = raw["provider"]["project_id"]
            assert account["email"].endswith(f"@{project}.iam.gserviceaccount.com"), name
            assert "https://www.googleapis.com/auth/cloud-platform" in account["scopes"]


def test_code_reaches_every_node_without_shipping_the_environment_or_data(launcher):
    _, raw, prepared = launcher
    mounts = {remote: local for remote, local in raw["file_mounts"].items() if remote != AUTH_TOKEN}
    for remote, local in mounts.items():
        # Relative to the repository root, where `ray up` must run; never the
        # whole tree, which `ray up` would hash file by file (.venv, data/).
        assert (REPO / local).exists(), local
        assert (REPO / local).resolve() != REPO, remote
    for pattern in (".venv", "data", "runs"):
        assert pattern in raw["rsync_exclude"]
    # Every ~/vidray/... file the setup commands read is a mount.
    setup = " ".join(prepared["head_setup_commands"] + prepared["worker_setup_commands"])
    for used in set(re.findall(r"~/vidray/[\w.]+", setup)):
        assert used in mounts, used
    assert "-c ~/vidray/constraints.txt -e ~/vidray" in setup


def test_constraints_pin_torch_by_version_only_so_gpu_nodes_get_the_cuda_build():
    # The setup commands reuse constraints.txt from PyPI, whose Linux torch
    # wheel is the CUDA build; a "+cpu" local version would pin the CPU build.
    pins = dict(
        line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line
    )
    assert re.fullmatch(r"\d+\.\d+\.\d+", pins["torch"]), pins["torch"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", pins["ray"])


AUTH_TOKEN = "~/.ray/auth_token"


def test_dashboard_binds_loopback_and_token_auth_is_on_for_every_node(launcher):
    _, raw, prepared = launcher
    head_start = " ".join(prepared["head_start_ray_commands"])
    worker_start = " ".join(prepared["worker_start_ray_commands"])
    # The Jobs API runs any code it is sent: only the head itself (and the `ray dashboard` SSH tunnel) reaches it.
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert "--autoscaling-config" in head_start
    assert "dashboard" not in worker_start and "$RAY_HEAD_IP:6379" in worker_start
    # Nothing opens the dashboard port to the internet: users tunnel with `ray dashboard`.
    assert "8265" not in yaml.safe_dump(raw["provider"])
    # Token auth on every node that starts Ray, with the laptop's token mounted on each.
    for commands in (prepared["head_start_ray_commands"], prepared["worker_start_ray_commands"]):
        start = [c for c in commands if "ray start" in c]
        assert start and all("export RAY_AUTH_MODE=token;" in c.split("ray start")[0] for c in start), start
    assert raw["file_mounts"][AUTH_TOKEN] == AUTH_TOKEN


def _uses_spot(raw: dict) -> bool:
    node_configs = yaml.safe_dump([t["node_config"] for t in raw["available_node_types"].values()])
    return "MarketType: spot" in node_configs or "provisioningModel: SPOT" in node_configs or "preemptible: true" in node_configs


@pytest.mark.parametrize("config", ["coin12.yaml", "coin12_reference.yaml"])
def test_gpu_run_configs_survive_a_spot_worker_lost_mid_run(launcher, config):
    # The launcher configs put training on spot GPUs first: a reclaimed node must cost a restart
    # from the last checkpoint (Ray Train's FailureConfig), not the trial.
    _, raw, _ = launcher
    train = load_config(REPO / "configs" / config).train
    assert train.use_gpu and _uses_spot(raw)
    assert train.max_failures >= 1, f"configs/{config}: train.max_failures={train.max_failures}"


def test_autoscaler_parses_the_node_types(autoscaling, launcher):
    _, raw, _ = launcher
    node_types = autoscaling.get_node_type_configs()
    assert set(node_types) == set(raw["available_node_types"])
    assert autoscaling.get_max_num_worker_nodes() == raw["max_workers"]
    assert node_types["gpu_spot"].priority > node_types["gpu_ondemand"].priority


def _plan(autoscaling, demands=(), gangs=(), unavailable=()):
    """{node type: count} Ray's v2 scheduler launches next to a fresh head, and the infeasible count."""
    head = AutoscalerInstance(
        im_instance=Instance(
            instance_id="head-0",
            instance_type=autoscaling.get_head_node_type(),
            status=Instance.RAY_INSTALLING,
            node_kind=NodeKind.HEAD,
        )
    )
    request = SchedulingRequest(
        disable_launch_config_check=True,
        node_type_configs=autoscaling.get_node_type_configs(),
        max_num_nodes=autoscaling.get_max_num_nodes(),
        resource_requests=ResourceRequestUtil.group_by_count([ResourceRequestUtil.make(d) for d in demands]),
        gang_resource_requests=[
            GangResourceRequest(requests=[ResourceRequestUtil.make(bundle) for bundle in gang]) for gang in gangs
        ],
        current_instances=[head],
        # What the autoscaler's cloud resource monitor reports right after a
        # launch of that type timed out (e.g. no spot capacity).
        recoverable_resource_availabilities={name: 0.0 for name in unavailable},
    )
    reply = ResourceDemandScheduler().schedule(request)
    launched = {launch.instance_type: launch.count for launch in reply.to_launch}
    return launched, len(reply.infeasible_resource_requests) + len(reply.infeasible_gang_resource_requests)


def _train_worker_bundle(train: TrainSettings) -> dict:
    # The per-worker resources vidray asks Ray Train for (one placement-group bundle each).
    return {"CPU": train.cpus_per_worker, "GPU": 1 if train.use_gpu else 0}


def test_decode_tasks_scale_out_on_cpu_nodes_not_gpu_nodes(autoscaling):
    # `vidray preprocess`: one 1-CPU decode task per video in flight.
    launched, infeasible = _plan(autoscaling, demands=[{"CPU": 1}] * 40)
    assert infeasible == 0
    assert set(launched) == {"cpu_spot"}


def test_training_gangs_land_on_spot_gpus_first_then_on_demand(autoscaling):
    bundle = _train_worker_bundle(TrainSettings(use_gpu=True, num_workers=4, cpus_per_worker=3))
    # One 4-GPU trial.
    launched, infeasible = _plan(autoscaling, gangs=[[bundle] * 4])
    assert (launched, infeasible) == ({"gpu_spot": 4}, 0)
    # Three concurrent 4-GPU trials: 12 GPUs, more than the spot type's max_workers.
    spot_max = autoscaling.get_node_type_configs()["gpu_spot"].max_worker_nodes
    launched, infeasible = _plan(autoscaling, gangs=[[bundle] * 4] * 3)
    assert launched["gpu_spot"] == spot_max and launched["gpu_ondemand"] == 12 - spot_max and infeasible == 0


def test_on_demand_takes_over_when_spot_launches_fail(autoscaling):
    bundle = _train_worker_bundle(TrainSettings(use_gpu=True, num_workers=2, cpus_per_worker=3))
    launched, infeasible = _plan(autoscaling, gangs=[[bundle] * 2], unavailable=["gpu_spot"])
    assert (launched, infeasible) == ({"gpu_ondemand": 2}, 0)


def test_a_worker_bigger_than_a_gpu_node_is_reported_infeasible(autoscaling):
    gpu_cpus = autoscaling.get_node_type_configs()["gpu_spot"].resources["CPU"]
    launched, infeasible = _plan(autoscaling, gangs=[[{"CPU": gpu_cpus + 1, "GPU": 1}]])
    assert (launched, infeasible) == ({}, 1)


def test_the_coin12_sweep_fits_the_gpu_nodes(autoscaling):
    # configs/coin12.yaml runs one GPU worker per trial with train.cpus_per_worker
    # CPUs: each worker must fit on one GPU node, and a sweep of several trials
    # must scale out over the spot GPU type.
    train = load_config(REPO / "configs" / "coin12.yaml").train
    assert train.use_gpu
    bundle = _train_worker_bundle(train)
    launched, infeasible = _plan(autoscaling, gangs=[[bundle] * train.num_workers] * 4)
    assert infeasible == 0 and launched == {"gpu_spot": 4 * train.num_workers}


# ------------------------------------------------- what vidray counts on a `ray up` cluster (vidray.cluster)


@pytest.mark.parametrize(
    ("max_workers", "head_max_workers"),
    [(None, None), (3, None), (3, 2), (0, None)],  # None: as the file has it (12 workers, 16 by type; 0 of the head's)
)
def test_capacity_is_what_rays_scheduler_can_launch(launcher, tmp_path, max_workers, head_max_workers):
    # Ray's global max_workers caps the sum of worker nodes over all types (the head not among them), and the
    # head's type adds worker nodes of its own shape up to its max_workers: every total vidray checks a run
    # against is what Ray's own scheduler can reach under those limits, no more (it would accept a run that
    # can never start, which Ray Train V2 then waits for forever) and no less.
    _, raw, _ = launcher
    raw = copy.deepcopy(raw)
    if max_workers is not None:
        raw["max_workers"] = max_workers
    if head_max_workers is not None:
        raw["available_node_types"][raw["head_node_type"]]["max_workers"] = head_max_workers
    bootstrap = tmp_path / "ray_bootstrap_config.yaml"
    bootstrap.write_text(yaml.safe_dump(raw))
    capacity = _autoscaling_capacity(bootstrap)
    autoscaling = AutoscalingConfig(copy.deepcopy(raw), skip_content_hash=True)
    for train in (
        TrainSettings(use_gpu=True, num_workers=1, cpus_per_worker=4),
        TrainSettings(use_gpu=False, num_workers=1, cpus_per_worker=4),
        TrainSettings(use_gpu=False, num_workers=1, cpus_per_worker=16),
    ):
        fit, bundle = capacity.workers_fit(train), _train_worker_bundle(train)
        shape = (bundle, fit)
        assert _plan(autoscaling, gangs=[[bundle] * fit])[1] == 0, shape
        assert _plan(autoscaling, gangs=[[bundle] * (fit + 1)])[1] == 1, shape
    for resource, total in (("CPU", capacity.total_cpus), ("GPU", capacity.total_gpus)):
        assert _plan(autoscaling, demands=[{resource: 1}] * int(total))[1] == 0, (resource, total)
        assert _plan(autoscaling, demands=[{resource: 1}] * (int(total) + 1))[1] == 1, (resource, total)


def test_the_global_max_workers_caps_what_a_run_is_checked_against(tmp_path):
    # 6 worker nodes by type, but at most 2 at once: 2 GPUs (not 4) and 4 + 2 x 16 CPUs (not 68).
    bootstrap = bootstrap_config(tmp_path, {
        "head": {"resources": {"CPU": 4}, "max_workers": 0},
        "gpu_spot": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 2},
        "gpu_ondemand": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 2},
        "cpu": {"resources": {"CPU": 16}, "max_workers": 2},
    }, max_workers=2)  # fmt: skip
    capacity = _autoscaling_capacity(bootstrap)
    where = f"the autoscaler's node types ({bootstrap})"
    gpu_train = TrainSettings(use_gpu=True, num_workers=1, cpus_per_worker=4)
    cpu_train = TrainSettings(use_gpu=False, num_workers=1, cpus_per_worker=4)
    assert (capacity.total_cpus, capacity.total_gpus) == (4 + 2 * 16, 2)
    assert (capacity.node_cpus, capacity.node_gpus, capacity.gpu_node_cpus()) == (16, 1, [8])
    assert capacity.workers_fit(gpu_train) == 2  # one a GPU node, none on the head
    assert capacity.workers_fit(cpu_train) == 1 + 2 * 4  # the head's one, and four on each 16-CPU node
    assert capacity.describe() == "1 x 4 CPUs plus at most 2 worker nodes of: 2 x 16 CPUs, 2 x 8 CPUs and 1 GPU"

    # Runs that all six nodes would hold, refused in one line that names the cap.
    refused = {
        "train.num_workers=3 GPU workers but {where} has 2 GPUs within max_workers=2 worker nodes; "
        "lower train.num_workers": gpu_train.model_copy(update={"num_workers": 3}),
        "one run needs train.num_workers x train.cpus_per_worker = 10 x 4 CPUs plus 1 for Ray Data to stream "
        "the shards, but {where} has 36 within max_workers=2 worker nodes; lower train.num_workers or "
        "train.cpus_per_worker": cpu_train.model_copy(update={"num_workers": 10}),
        "one run needs train.num_workers=7 workers, each with train.cpus_per_worker=5 CPUs on one node, but the "
        "nodes of {where} hold only 6 of them (1 x 4 CPUs plus at most 2 worker nodes of: 2 x 16 CPUs, "
        "2 x 8 CPUs and 1 GPU); lower train.num_workers or train.cpus_per_worker": cpu_train.model_copy(
            update={"num_workers": 7, "cpus_per_worker": 5}
        ),
    }
    for message, train in refused.items():
        with pytest.raises(UserError) as error:
            check_run_resources(train, capacity)
        assert str(error.value) == message.format(where=where)
    check_run_resources(gpu_train.model_copy(update={"num_workers": 2}), capacity)
    check_run_resources(cpu_train.model_copy(update={"num_workers": 8}), capacity)  # 33 of 36 CPUs

    # Trials side by side: one a GPU node (2, not 4); 4-CPU trials on 35 spare CPUs (8, not 16).
    assert derive_max_concurrent_trials(gpu_train, capacity) == 2
    assert derive_max_concurrent_trials(cpu_train, capacity) == 8


def test_worker_nodes_of_the_head_type_count_under_the_cap(tmp_path):
    # The head's type may add workers of its own shape (its max_workers, 0 unless set); they too count
    # against the global max_workers, and the head itself does not.
    bootstrap = bootstrap_config(tmp_path, {
        "head": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 2},
        "small": {"resources": {"CPU": 2}, "max_workers": 4},
    }, max_workers=3)  # fmt: skip
    capacity = _autoscaling_capacity(bootstrap)
    assert (capacity.total_cpus, capacity.total_gpus) == (8 + 2 * 8 + 2, 3)
    assert capacity.describe() == "1 x 8 CPUs and 1 GPU plus at most 3 worker nodes of: 3 x 2 CPUs, 2 x 8 CPUs and 1 GPU"
    # Without a cap to bind (3 of 3+ allowed), the totals are every node's, as before.
    config = yaml.safe_load(bootstrap.read_text())
    config["max_workers"] = 6
    bootstrap.write_text(yaml.safe_dump(config))
    capacity = _autoscaling_capacity(bootstrap)
    assert (capacity.total_cpus, capacity.total_gpus) == (8 + 2 * 8 + 4 * 2, 3)
    assert capacity.describe() == "4 x 2 CPUs, 3 x 8 CPUs and 1 GPU"
