"""The update recipes of docs/artifacts.md, run as written there (the shell blocks are read from the
page, so the page cannot drift from what is tested), with the environment the agent gives a job
with artifacts (agent.download.artifact_environment).

- The container recipe runs against an image tarball laid out as `docker save` makes it, with a
  stand-in `docker` first on PATH (this machine has the docker client but no daemon, and no
  podman): it checks that `load` gets a real image tarball, keeps what is loaded and running in
  a state file, answers the health status, and records every call.
- The .deb recipe builds small packages with dpkg-deb and installs them with the real dpkg under
  a temporary root (DPKG_OPTS=--root=...), so the machine's own packages are untouched.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from agent.artifact_cache import Artifact
from agent.download import artifact_environment
from tests.support.processes import REPO

PAGE = (REPO / "docs" / "artifacts.md").read_text()


def recipe(script: str) -> str:
    """The ```sh block of docs/artifacts.md that is the script `script`."""
    for body in re.findall(r"```sh\n(.*?)```", PAGE, flags=re.S):
        if body.startswith(f"#!/bin/sh\n# {script} "):
            return body
    raise AssertionError(f"docs/artifacts.md has no sh block for {script}")


def run_recipe(tmp_path: Path, script: str, artifact_file: Path, args: list[str],
               env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the recipe as the agent would run it for a job whose only artifact is artifact_file."""
    path = tmp_path / script
    path.write_text(recipe(script))
    data = artifact_file.read_bytes()
    artifact = Artifact(hashlib.sha256(data).hexdigest(), len(data), artifact_file.name, "http://unused/")
    job_env = artifact_environment(artifact_file.parent, [artifact_file], [artifact])
    return subprocess.run(["sh", str(path), *args], env={**os.environ, **job_env, **env}, capture_output=True,
                          text=True, timeout=60)


# --- the container recipe -------------------------------------------------------------------


FAKE_DOCKER = '''#!{python}
"""A stand-in for `docker`: load, inspect, rm and run, on a JSON state file; every call is logged."""
import json, os, sys, tarfile

state_path, log_path = os.environ["FAKE_DOCKER_STATE"], os.environ["FAKE_DOCKER_LOG"]
state = json.load(open(state_path))
args = sys.argv[1:]
with open(log_path, "a") as log:
    log.write(json.dumps(args) + "\\n")


def save():
    json.dump(state, open(state_path, "w"))


def load(path):
    """Refuse anything but a `docker save` tarball: manifest.json naming a config and layers it holds."""
    try:
        with tarfile.open(path) as tar:
            members = set(tar.getnames())
            manifest = json.load(tar.extractfile("manifest.json"))
    except (tarfile.TarError, KeyError, ValueError) as e:
        sys.exit(f"open {{path}}: not an image archive: {{e}}")
    for image in manifest:
        missing = [name for name in [image["Config"], *image["Layers"]] if name not in members]
        if missing:
            sys.exit(f"invalid archive: {{missing}} missing")
        for tag in image["RepoTags"]:
            state["images"].append(tag)
            print(f"Loaded image: {{tag}}")
    save()


if args[:2] == ["load", "-i"]:
    load(args[2])
elif args[0] == "inspect":
    image = state["containers"].get(args[3])
    if image is None:
        sys.exit(f"Error: No such object: {{args[3]}}")
    if args[2] == "{{{{.Config.Image}}}}":
        print(image)
    elif args[2] == "{{{{.State.Health.Status}}}}":
        print("unhealthy" if image in os.environ.get("FAKE_DOCKER_UNHEALTHY", "").split(",") else "healthy")
    else:
        sys.exit(f"unexpected format {{args[2]}}")
elif args[:2] == ["rm", "-f"]:
    state["containers"].pop(args[2], None)
    save()
elif args[:2] == ["run", "-d"]:
    name, image = args[args.index("--name") + 1], args[-1]
    if image not in state["images"]:
        sys.exit(f"Unable to find image {{image!r}} locally")
    state["containers"][name] = image
    save()
    print("0123456789ab")
else:
    sys.exit(f"fake docker: unexpected call {{args}}")
'''


def image_tarball(path: Path, tag: str) -> Path:
    """An image archive as `docker save` lays it out: manifest.json, the config, one layer."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        add_bytes(tar, "app/version", tag.encode())
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/app/run"]}}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = [{"Config": config_name, "RepoTags": [tag], "Layers": ["layer0/layer.tar"]}]
    with tarfile.open(path, "w") as tar:
        add_bytes(tar, config_name, config)
        add_bytes(tar, "layer0/layer.tar", layer.getvalue())
        add_bytes(tar, "manifest.json", json.dumps(manifest).encode())
    return path


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


class FakeDocker:
    def __init__(self, tmp_path: Path) -> None:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        docker = bin_dir / "docker"
        docker.write_text(FAKE_DOCKER.format(python=sys.executable))
        docker.chmod(0o755)
        self.state, self.log = tmp_path / "docker-state.json", tmp_path / "docker-calls"
        self.state.write_text(json.dumps({"images": ["web:1.0"], "containers": {"web": "web:1.0"}}))
        self.env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_DOCKER_STATE": str(self.state),
                    "FAKE_DOCKER_LOG": str(self.log), "HEALTH_TIMEOUT": "5"}

    @property
    def running(self) -> str | None:
        return json.loads(self.state.read_text())["containers"].get("web")

    def calls(self) -> list[list[str]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []


@pytest.fixture
def docker(tmp_path):
    return FakeDocker(tmp_path)


def test_the_container_recipe_loads_the_image_and_runs_it_when_healthy(tmp_path, docker):
    tarball = image_tarball(tmp_path / "web-2.0.tar", "web:2.0")
    done = run_recipe(tmp_path, "container-update.sh", tarball, ["web", "-p", "8080:8080"], docker.env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert docker.running == "web:2.0"
    assert ["load", "-i", str(tarball)] in docker.calls()
    assert ["run", "-d", "--name", "web", "--restart", "unless-stopped", "-p", "8080:8080", "web:2.0"] in docker.calls()
    assert "web: web:1.0 -> web:2.0" in done.stdout and "web runs web:2.0, healthy" in done.stdout


def test_the_container_recipe_rolls_back_to_the_previous_tag_when_unhealthy(tmp_path, docker):
    tarball = image_tarball(tmp_path / "web-2.0.tar", "web:2.0")
    done = run_recipe(tmp_path, "container-update.sh", tarball, ["web"],
                      {**docker.env, "FAKE_DOCKER_UNHEALTHY": "web:2.0"})
    assert done.returncode == 1
    assert docker.running == "web:1.0"
    runs = [call[-1] for call in docker.calls() if call[0] == "run"]
    assert runs == ["web:2.0", "web:1.0"]
    assert "web rolled back to web:1.0" in done.stderr


def test_the_container_recipe_refuses_a_file_that_is_no_image_and_changes_nothing(tmp_path, docker):
    not_an_image = tmp_path / "web.tar"
    not_an_image.write_bytes(os.urandom(1000))
    done = run_recipe(tmp_path, "container-update.sh", not_an_image, ["web"], docker.env)
    assert done.returncode != 0 and "not an image archive" in done.stderr
    assert docker.running == "web:1.0" and [call[0] for call in docker.calls()] == ["load"]


# --- the .deb recipe -----------------------------------------------------------------------

needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg (Debian)")
PACKAGE = "ota-recipe-test"


def build_deb(tmp_path: Path, version: str, healthy: bool) -> Path:
    """A package holding /usr/bin/ota-recipe-test, which prints its version and exits 0 when healthy."""
    tree = tmp_path / f"tree-{version}"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {PACKAGE}\nVersion: {version}\nArchitecture: all\nMaintainer: tests <tests@example.com>\n"
        "Description: a package for the .deb recipe's test\n")
    program = tree / "usr" / "bin" / PACKAGE
    program.write_text(f"#!/bin/sh\necho {version}\nexit {0 if healthy else 1}\n")
    program.chmod(0o755)
    deb = tmp_path / f"{PACKAGE}_{version}_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(deb)], check=True,
                   capture_output=True, timeout=30)
    return deb


class TempRoot:
    """An empty dpkg database under a temporary directory: dpkg --root=... installs there."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "root"
        admin = self.root / "var" / "lib" / "dpkg"
        for sub in ("info", "updates"):
            (admin / sub).mkdir(parents=True)
        for name in ("status", "available"):
            (admin / name).touch()
        self.keep = tmp_path / "keep"
        self.env = {"DPKG_OPTS": f"--root={self.root}", "KEEP_DIR": str(self.keep), "HEALTH_TRIES": "2"}
        self.health_check = [str(self.root / "usr" / "bin" / PACKAGE)]

    def installed(self) -> str:
        return subprocess.run(["dpkg-query", f"--root={self.root}", "-W", "-f", "${Version} ${Status}", PACKAGE],
                              capture_output=True, text=True, timeout=30).stdout

    def program_says(self) -> str:
        return subprocess.run(self.health_check, capture_output=True, text=True, timeout=30).stdout.strip()


@needs_dpkg
def test_the_deb_recipe_keeps_a_healthy_version_and_rolls_a_failing_one_back(tmp_path):
    root = TempRoot(tmp_path)
    good, bad, better = build_deb(tmp_path, "1.0", True), build_deb(tmp_path, "2.0", False), \
        build_deb(tmp_path, "2.1", True)

    done = run_recipe(tmp_path, "deb-update.sh", good, root.health_check, root.env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert root.installed() == "1.0 install ok installed" and root.program_says() == "1.0"
    assert (root.keep / f"{PACKAGE}.deb").read_bytes() == good.read_bytes()

    done = run_recipe(tmp_path, "deb-update.sh", bad, root.health_check, root.env)
    assert done.returncode == 1
    assert root.installed() == "1.0 install ok installed" and root.program_says() == "1.0"
    assert f"{PACKAGE} rolled back to 1.0" in done.stderr
    assert (root.keep / f"{PACKAGE}.deb").read_bytes() == good.read_bytes()

    done = run_recipe(tmp_path, "deb-update.sh", better, root.health_check, root.env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert root.installed() == "2.1 install ok installed" and root.program_says() == "2.1"
    assert (root.keep / f"{PACKAGE}.deb").read_bytes() == better.read_bytes()
    system = subprocess.run(["dpkg-query", "-W", PACKAGE], capture_output=True, text=True, timeout=30)
    assert system.returncode != 0  # the machine's own dpkg database never heard of it


@needs_dpkg
def test_the_deb_recipe_removes_a_failing_package_that_was_not_installed_before(tmp_path):
    root = TempRoot(tmp_path)
    done = run_recipe(tmp_path, "deb-update.sh", build_deb(tmp_path, "2.0", False), root.health_check, root.env)
    assert done.returncode == 1
    assert "removed: it was not installed before" in done.stderr
    assert root.installed() == "" and not (root.root / "usr" / "bin" / PACKAGE).exists()
