"""The Dockerfile, validated statically (there is no Docker here): multi-stage on a CUDA base with
the gpu extra installed by the same bootstrap script the Makefile runs, a non-root user, state on a
volume, and a HEALTHCHECK that is a real `airlock health` command line."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from control.cli import build_parser
from gateway import config as config_mod

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def instructions() -> list[dict[str, str]]:
    parser = DockerfileParser(str(ROOT / "Dockerfile"))
    return [i for i in parser.structure if i["instruction"] != "COMMENT"]


def stages(instructions: list[dict[str, str]]) -> list[list[dict[str, str]]]:
    out: list[list[dict[str, str]]] = []
    for i in instructions:
        if i["instruction"] == "FROM":
            out.append([])
        if out:
            out[-1].append(i)
    return out


def values(stage: list[dict[str, str]], instruction: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == instruction]


def test_multi_stage_on_cuda_bases(instructions: list[dict[str, str]]) -> None:
    built = stages(instructions)
    assert len(built) >= 2
    names = [re.split(r"\s+AS\s+", s[0]["value"], flags=re.I) for s in built]
    assert all(len(n) == 2 for n in names), "every stage is named"
    assert all(n[0].startswith("nvidia/cuda:") for n in names)
    assert "runtime" in names[-1][0] and "devel" not in names[-1][0]  # no compilers in the final image
    earlier = {n[1] for n in names[:-1]}
    for stage in built:
        for copy in values(stage, "COPY"):
            source = re.match(r"--from=(\S+)", copy)
            if source:
                assert source.group(1) in earlier


def test_install_reuses_the_makefile_bootstrap_with_the_gpu_extra(instructions: list[dict[str, str]]) -> None:
    runs = " ".join(values(stages(instructions)[0], "RUN"))
    assert "./scripts/bootstrap.sh" in runs and "AIRLOCK_EXTRAS=gateway,gpu" in runs
    assert "./scripts/bootstrap.sh" in (ROOT / "Makefile").read_text()
    bootstrap = (ROOT / "scripts" / "bootstrap.sh").read_text()
    assert all(knob in bootstrap for knob in ("AIRLOCK_EXTRAS", "AIRLOCK_TORCH", "AIRLOCK_EDITABLE", "VENV"))
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "vllm" in extras["gpu"] and "airlock[worker]" in extras["gpu"]
    # The image holds every package the processes it runs import.
    copied = {c.split()[0].rstrip("/") for c in values(stages(instructions)[0], "COPY")}
    assert {"airlock", "serving", "gateway", "control", "worker"} <= copied


def test_every_copied_path_exists(instructions: list[dict[str, str]]) -> None:
    for stage in stages(instructions):
        for copy in values(stage, "COPY"):
            if copy.startswith("--from="):
                continue
            *sources, _target = copy.split()
            for source in sources:
                assert (ROOT / source).exists(), source


def test_runs_as_a_non_root_user(instructions: list[dict[str, str]]) -> None:
    final = stages(instructions)[-1]
    [user] = values(final, "USER")
    uid = user.split(":")[0]
    assert uid not in ("0", "root") and int(uid) >= 1000


def test_state_lives_on_a_volume_for_a_read_only_root(
    instructions: list[dict[str, str]], tmp_path: Path
) -> None:
    final = stages(instructions)[-1]
    [volume] = values(final, "VOLUME")
    text = (ROOT / "deploy" / "docker" / "airlock.toml").read_text()
    text = text.replace('policy_dir = "/etc/airlock/policy"', f'policy_dir = "{ROOT / "policy"}"')
    (tmp_path / "airlock.toml").write_text(text)
    cfg = config_mod.load(tmp_path / "airlock.toml")
    assert json.loads(volume) == [str(cfg.state_dir)]
    assert cfg.gateway.listen.startswith("0.0.0.0:")  # reachable from outside the container


def test_healthcheck_is_the_grpc_health_command(instructions: list[dict[str, str]]) -> None:
    final = stages(instructions)[-1]
    [health] = values(final, "HEALTHCHECK")
    command = json.loads(health.split("CMD", 1)[1].strip())
    assert command[:2] == ["airlock", "health"]
    args = build_parser().parse_args(command[1:])  # fails if the CLI has no such flags
    assert args.handler == "ops:cmd_health"
    [entrypoint], [cmd] = values(final, "ENTRYPOINT"), values(final, "CMD")
    assert json.loads(entrypoint) == ["airlock"]
    assert build_parser().parse_args(json.loads(cmd)).handler == "stack:cmd_up"
