"""Slurm option validation, per-job resources, submitit parameters and the golden sbatch text."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cnncam.config import SlurmConfig, load_config
from cnncam.errors import ConfigError, LaunchError
from cnncam.launch import params as P
from cnncam.launch.submitit_api import sbatch_text

GOLDEN = Path(__file__).parent / "golden"
FOLDER = Path("/cluster/home/me/runs/demo/slurm/%j")


def _slurm(*overrides: str) -> SlurmConfig:
    return load_config(None, [f"slurm.{o}" for o in overrides]).slurm


@pytest.mark.parametrize(
    ("text", "minutes"),
    [
        ("90", 90),
        ("0:30", 1),
        ("5:00", 5),
        ("1:30:00", 90),
        ("1:30:01", 91),
        ("2-0", 2880),
        ("1-12:00", 2160),
        ("1-00:00:30", 1441),
    ],
)
def test_parse_time_accepts_slurm_formats(text: str, minutes: int) -> None:
    assert P.parse_time(text) == minutes


@pytest.mark.parametrize("text", ["", "1h", "1:2:3:4", "-5", "0", "0:00"])
def test_parse_time_rejects_garbage(text: str) -> None:
    with pytest.raises(ConfigError, match="time limit|at least one minute"):
        P.parse_time(text)


def test_resolve_executor_auto_states_why() -> None:
    assert P.resolve_executor("auto", which=lambda _: "/usr/bin/sbatch") == ("slurm", "sbatch found on PATH")
    name, why = P.resolve_executor("auto", which=lambda _: None)
    assert name == "local" and "no sbatch" in why
    assert P.resolve_executor("inline", which=lambda _: None) == ("inline", "requested")


def test_resolve_executor_errors_list_choices() -> None:
    with pytest.raises(LaunchError, match="sbatch is not on PATH"):
        P.resolve_executor("slurm", which=lambda _: None)
    assert P.resolve_executor("slurm", dry_run=True, which=lambda _: None)[0] == "slurm"
    with pytest.raises(ConfigError, match="did you mean 'local'.*Valid choices: auto, slurm, local, inline"):
        P.resolve_executor("locl")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("partition=gpu;rm -rf ~", "slurm.partition .* not a valid Slurm name"),
        ("account=a b", "slurm.account"),
        ("qos=x$(id)", "slurm.qos"),
        ("constraint=a100 && reboot", "slurm.constraint"),
        ("extra_sbatch=['-w node1']", "one long sbatch option"),
        ("extra_sbatch=['-p gpu']", "may not set -p \\(sbatch reads it as --partition\\)"),
        ("extra_sbatch=['--output=/tmp/x']", "may not set --output: the launcher sets it"),
        ("extra_sbatch=['--partition=cpu']", "may not set --partition: use --partition"),
        ("extra_sbatch=['--time=5']", "use --time"),
        ("time_min=1", "signal_delay_s \\(120\\) must be >= 0 and shorter than the time limit"),
        ("tasks_per_node=0", "slurm.tasks_per_node must be > 0"),
        ("executor=slrum", "did you mean 'slurm'"),
    ],
)
def test_bad_slurm_values_fail_at_load_time(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _slurm(override)


def test_newlines_are_refused_even_where_quotes_are_allowed() -> None:
    # YAML lets a value hold a newline; in an #SBATCH line it would start a shell line.
    with pytest.raises(ConfigError, match="job_name"):
        load_config(None, ["slurm.job_name=x\nrm -rf ~"])
    with pytest.raises(ConfigError, match="setup\\[1\\].*newline"):
        _slurm('setup=["module load cuda", "a\\nb"]')
    with pytest.raises(ConfigError, match="without newlines"):
        _slurm('extra_sbatch=["--comment=a\\nb"]')
    ok = _slurm('job_name=it\'s "x" $(touch y)', 'setup=["source \\"my env/bin/activate\\""]')
    assert ok.job_name == 'it\'s "x" $(touch y)'


def test_resources_per_job_kind() -> None:
    cfg = _slurm("gpus_per_node=4", "nodes=2", "partition=gpu", "cpu_partition=cpu")
    assert P.resources("train", cfg) == P.Resources(2, 4, 4, "gpu")  # one task per GPU
    assert P.resources("cam", cfg) == P.Resources(1, 1, 1, "gpu")  # a shard: one GPU
    assert P.resources("merge", cfg) == P.Resources(1, 1, 0, "cpu")
    assert P.resources("report", cfg) == P.Resources(1, 1, 0, "cpu")
    cpu_ddp = _slurm("gpus_per_node=0", "tasks_per_node=2")
    assert P.resources("train", cpu_ddp) == P.Resources(1, 2, 0, None)
    assert P.resources("cam", cpu_ddp).gpus_per_node == 0
    with pytest.raises(ConfigError, match="unknown job kind 'trian'; did you mean 'train'"):
        P.resources("trian", cpu_ddp)


def test_slurm_parameters_map_every_option() -> None:
    cfg = _slurm(
        "partition=gpu",
        "gpus_per_node=2",
        "mem_gb=7.5",
        "account=proj",
        "qos=high",
        "constraint=a100",
        "job_name=exp",
        "time_min=90",
        "signal_delay_s=300",
        "array_parallelism=4",
        'extra_sbatch=["--exclusive", "--reservation=r1"]',
        'setup=["module load cuda"]',
    )
    p = P.slurm_parameters("train", cfg, "demo", P.afterok(["12", "13"]))
    assert p == {
        "job_name": "exp-train",
        "time": 90,
        "nodes": 1,
        "ntasks_per_node": 2,
        "cpus_per_task": 4,
        "signal_delay_s": 300,
        "array_parallelism": 4,
        "gpus_per_node": 2,
        "partition": "gpu",
        "mem": "7680MB",
        "account": "proj",
        "qos": "high",
        "constraint": "a100",
        "dependency": "afterok:12:13",
        "setup": ["module load cuda"],
        "additional_parameters": {"requeue": True, "exclusive": True, "reservation": "r1"},
    }
    merge = P.slurm_parameters("merge", cfg, "demo")
    assert "gpus_per_node" not in merge and "requeue" not in merge["additional_parameters"]
    assert P.slurm_parameters("report", _slurm(), "demo")["job_name"] == "cnncam-demo-report"
    assert P.afterok([]) is None


def test_local_parameters_single_node_only() -> None:
    assert P.local_parameters("train", _slurm("gpus_per_node=0", "tasks_per_node=2")) == {
        "timeout_min": 60,
        "gpus_per_node": 0,
        "tasks_per_node": 2,
        "signal_delay_s": 120,
    }
    with pytest.raises(ConfigError, match="local executor runs on one node"):
        P.local_parameters("train", _slurm("nodes=2"))


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("CNNCAM_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), (
        f"sbatch text changed; if intended, rerun with CNNCAM_UPDATE_GOLDEN=1 ({path})"
    )


def test_train_sbatch_matches_golden() -> None:
    cfg = _slurm(
        "partition=gpu",
        "nodes=2",
        "gpus_per_node=4",
        "cpus_per_task=8",
        "mem_gb=64",
        "time_min=1440",
        "account=proj",
        "qos=normal",
        "constraint=a100&ib",
        "job_name=my exp's",
        "signal_delay_s=180",
        'extra_sbatch=["--exclusive", "--mail-type=END"]',
        'setup=["module load cuda/12.1", "source $HOME/venvs/cnncam/bin/activate"]',
    )
    text = sbatch_text(P.slurm_parameters("train", cfg, "demo"), FOLDER, "python")
    _golden("train.sbatch", text)
    assert "#SBATCH --job-name='my exp'\"'\"'s-train'" in text  # quoted, one line


def test_cam_array_sbatch_matches_golden() -> None:
    cfg = _slurm(
        "partition=gpu", "gpus_per_node=4", "array_parallelism=2", "time_min=30", "signal_delay_s=60"
    )
    text = sbatch_text(P.slurm_parameters("cam", cfg, "demo", "afterok:41"), FOLDER, "python", array_size=5)
    _golden("cam_array.sbatch", text)
    assert "#SBATCH --array=0-4%2" in text and "#SBATCH --gpus-per-node=1" in text
    assert "%A_%a_%t_log.out" in text
