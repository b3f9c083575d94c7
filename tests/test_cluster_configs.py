"""Static checks of the cluster and infra configs (cluster/, infra/Dockerfile, infra/mlflow/):
they parse, carry what Ray's cluster launcher, KubeRay and Docker Compose need, authenticate Ray
with a token, log to MLflow, use one image name, and every `python -m kpscale.X ...` they run or
document is accepted by kpscale's own config checks. No Ray is started, no Docker, no network."""

from __future__ import annotations

import configparser
import copy
import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
DOCKERFILE = ROOT / "infra" / "Dockerfile"
MLFLOW = ROOT / "infra" / "mlflow"
COMPOSE = MLFLOW / "docker-compose.yaml"
SHARED = "/mnt/shared"  # the claim's mount point: cluster paths under it cannot exist here
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

# Every file that documents or runs a kpscale command, scanned by test_kpscale_commands_are_valid.
COMMAND_FILES = [*sorted(CLUSTER.rglob("*.yaml")), CLUSTER / "README.md", DOCKERFILE,
                 MLFLOW / "README.md", COMPOSE]


def load_all(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def load_one(path: Path) -> dict:
    docs = load_all(path)
    assert len(docs) == 1, f"{path}: expected one YAML document, found {len(docs)}"
    return docs[0]


def pin(name: str) -> str:
    """The version pyproject.toml pins `name` to."""
    for req in PYPROJECT["dependencies"]:
        m = re.fullmatch(rf"{re.escape(name)}(\[[^\]]*\])?==(\S+)", req)
        if m:
            return m.group(2)
    raise AssertionError(f"pyproject.toml pins no {name}")


def dockerfile_env() -> dict[str, str]:
    instructions = re.sub(r"\\\n", " ", DOCKERFILE.read_text()).splitlines()  # continuations joined
    return dict(re.findall(r"(\w+)=(\S+)", " ".join(i for i in instructions if i.startswith("ENV "))))


def image_name() -> str:
    """The image infra/Dockerfile's header says it builds."""
    m = re.search(r"^# Image: (\S+)", DOCKERFILE.read_text(), re.M)
    assert m, "infra/Dockerfile's header names no image ('# Image: NAME')"
    return m.group(1)


# ---------------------------------------------------------------- every YAML file

def test_every_yaml_parses():
    paths = sorted({*CLUSTER.rglob("*.y*ml"), *(ROOT / "infra").rglob("*.y*ml")})
    names = {p.relative_to(ROOT).as_posix() for p in paths}
    expected = {"cluster/ray-up-aws.yaml", "cluster/runtime_env.yaml", "cluster/kuberay/raycluster.yaml",
                "cluster/kuberay/rayjob.yaml", "cluster/kuberay/pvc.yaml",
                "cluster/kuberay/secrets.example.yaml", "infra/mlflow/docker-compose.yaml"}
    assert expected <= names, f"missing: {sorted(expected - names)}"
    for path in paths:
        docs = load_all(path)
        assert docs and all(isinstance(d, dict) and d for d in docs), f"{path}: empty or not a mapping"


# ---------------------------------------------------------------- Ray cluster launcher (AWS)

@pytest.fixture(scope="module")
def ray_up() -> dict:
    return load_one(CLUSTER / "ray-up-aws.yaml")


def test_ray_up_has_what_the_launcher_requires(ray_up):
    assert ray_up["cluster_name"]
    assert ray_up["provider"]["type"] == "aws" and ray_up["provider"]["region"]
    assert ray_up["auth"]["ssh_user"]
    types = ray_up["available_node_types"]
    assert ray_up["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != ray_up["head_node_type"]}
    assert workers, "no worker node type"
    for name, t in types.items():
        assert isinstance(t["resources"], dict) and t["node_config"]["InstanceType"], name
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"], name
    assert sum(t["min_workers"] for t in workers.values()) <= ray_up["max_workers"]
    assert any(t["resources"].get("GPU", 0) >= 1 for t in workers.values()), "no GPU worker type"
    assert types[ray_up["head_node_type"]]["resources"].get("CPU") == 0, "the head should run no training"


def test_ray_up_passes_rays_own_schema(ray_up):
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(ray_up, schema)
    validate_config(prepare_config(copy.deepcopy(ray_up)))  # with the AWS defaults filled in; no AWS call


def test_ray_up_installs_nothing_over_the_image(ray_up):
    # A missing key would be filled from Ray's defaults, which pip install a nightly Ray.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert key in ray_up and not any("pip install" in c for c in ray_up[key]), key
    assert ray_up["docker"]["image"] == image_name()


def test_ray_up_nodes_share_a_token_and_the_mlflow_environment(ray_up):
    mounts = ray_up["file_mounts"]
    assert any(remote.endswith(".ray/auth_token") for remote in mounts), "token not copied to the nodes"
    env_file = next((r for r, local in mounts.items() if local.endswith("cluster.env")), None)
    assert env_file, "no cluster.env mounted"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in ray_up[key] if "ray start" in c]
        assert start, key
        for cmd in start:
            assert re.search(r"\bRAY_AUTH_MODE=token\b", cmd), f"{key}: {cmd}"
            assert env_file in cmd and cmd.index(env_file) < cmd.index("ray start"), \
                f"{key}: cluster.env must be exported before ray start"
    example = (CLUSTER / "cluster.env.example").read_text()
    names = set(re.findall(r"^([A-Z_]+)=", example, re.M))
    assert {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= names


# ---------------------------------------------------------------- KubeRay

@pytest.fixture(scope="module")
def raycluster() -> dict:
    return load_one(KUBERAY / "raycluster.yaml")


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return load_one(KUBERAY / "rayjob.yaml")


@pytest.fixture(scope="module")
def secrets() -> dict[str, set[str]]:
    """Secret name -> its keys, from secrets.example.yaml."""
    docs = load_all(KUBERAY / "secrets.example.yaml")
    assert all(d["kind"] == "Secret" and d["apiVersion"] == "v1" for d in docs)
    return {d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {})) for d in docs}


@pytest.fixture(scope="module")
def pvc() -> dict:
    return load_one(KUBERAY / "pvc.yaml")


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def secret_refs(env: list[dict]) -> list[tuple[str, str]]:
    return [(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for e in env if "secretKeyRef" in e.get("valueFrom", {})]


def check_cluster_spec(spec: dict, where: str, secrets: dict, pvc: dict) -> None:
    image = image_name()
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), where
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no worker group"
    assert spec.get("enableInTreeAutoscaling") is True, where
    pods = [("head", head["template"]["spec"])]
    for g in groups:
        assert g["groupName"] and isinstance(g["rayStartParams"], dict), where
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{where}: {g['groupName']}"
        pods.append((g["groupName"], g["template"]["spec"]))
    gpus = [int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
            for g in groups for c in g["template"]["spec"]["containers"]]
    assert max(gpus) >= 1, f"{where}: no GPU worker group"

    claim = pvc["metadata"]["name"]
    for name, pod in pods:
        ray_container = pod["containers"][0]  # KubeRay's Ray container is the first
        assert ray_container["image"] == image, f"{where} {name}: image {ray_container['image']}"
        env = env_of(ray_container)
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where} {name}: RAY_AUTH_MODE"
        assert "RAY_AUTH_TOKEN" in env, f"{where} {name}: RAY_AUTH_TOKEN"
        assert env.get("MLFLOW_TRACKING_URI", {}).get("value", "").startswith("http"), f"{where} {name}"
        for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            assert "secretKeyRef" in env.get(var, {}).get("valueFrom", {}), f"{where} {name}: {var}"
        caps = env.get("NVIDIA_DRIVER_CAPABILITIES", {}).get("value", "").split(",")
        assert "video" in caps, f"{where} {name}: NVDEC needs the video driver capability"
        assert set(caps) == set(dockerfile_env()["NVIDIA_DRIVER_CAPABILITIES"].split(",")), \
            f"{where} {name}: driver capabilities differ from the image's"
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        shared = [m for m in ray_container.get("volumeMounts", []) if m["mountPath"] == SHARED]
        assert shared, f"{where} {name}: nothing mounted at {SHARED}"
        assert volumes[shared[0]["name"]]["persistentVolumeClaim"]["claimName"] == claim, f"{where} {name}"
        for secret, key in secret_refs(ray_container["env"]):
            assert key in secrets.get(secret, set()), f"{where} {name}: secret {secret}/{key} not in the example"

    autoscaler_env = env_of(spec.get("autoscalerOptions", {}))
    assert autoscaler_env.get("RAY_AUTH_MODE", {}).get("value") == "token" and "RAY_AUTH_TOKEN" in autoscaler_env, \
        f"{where}: the autoscaler sidecar needs the token"


def test_raycluster(raycluster, secrets, pvc):
    assert (raycluster["apiVersion"], raycluster["kind"]) == ("ray.io/v1", "RayCluster")
    check_cluster_spec(raycluster["spec"], "raycluster.yaml", secrets, pvc)


def test_rayjob(rayjob, secrets, pvc):
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    spec = rayjob["spec"]
    assert spec["entrypoint"].split()[:3] == ["python", "-m", "kpscale.train"]
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), "one of rayClusterSpec, clusterSelector"
    if "rayClusterSpec" in spec:
        assert spec["shutdownAfterJobFinishes"] is True
        check_cluster_spec(spec["rayClusterSpec"], "rayjob.yaml", secrets, pvc)
    if "runtimeEnvYAML" in spec:
        assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    # With a token from a Secret (no authOptions), the pod that runs `ray job submit` needs it too.
    if "authOptions" not in spec.get("rayClusterSpec", {}):
        submitter = spec["submitterPodTemplate"]["spec"]
        env = env_of(submitter["containers"][0])
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "RAY_AUTH_TOKEN" in env
        assert submitter["restartPolicy"] == "Never"
        assert submitter["containers"][0]["image"] == image_name()


def test_kuberay_manifests_share_a_namespace_and_the_claim_is_shared(pvc):
    namespaces = {doc["metadata"].get("namespace") for path in KUBERAY.glob("*.yaml") for doc in load_all(path)}
    assert len(namespaces) == 1 and None not in namespaces, namespaces
    assert (pvc["apiVersion"], pvc["kind"]) == ("v1", "PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]


# ---------------------------------------------------------------- kpscale commands

def logical_lines(text: str) -> list[str]:
    """Lines with comment markers stripped and backslash continuations joined."""
    out, pending = [], ""
    for line in text.splitlines():
        line = re.sub(r"^\s*#+\s?", "", line).strip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    return out + ([pending] if pending else [])


def parse_command(text: str) -> tuple[str, list[str]] | None:
    """`... python -m kpscale.X args` -> (module, args up to a shell separator or comment)."""
    m = re.search(r"(?:^|\s)\S*python3?\s+-m\s+(kpscale(?:\.\w+)*)(.*)$", text)
    if not m:
        return None
    rest = m.group(2).split("`")[0]  # inline code in Markdown ends at the backtick
    args = []
    for token in shlex.split(rest, comments=True):
        if token in (";", "&&", "||", "|", "&", ">", "2>&1"):
            break
        args.append(token)
    return m.group(1), args


def collect_commands() -> list[tuple[str, str, list[str]]]:
    found = {}
    for path in COMMAND_FILES:
        text = path.read_text()
        if path.suffix == ".yaml":  # comments only; YAML values that run commands are read below
            text = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
        for line in logical_lines(text):
            cmd = parse_command(line)
            if cmd:
                found.setdefault((cmd[0], tuple(cmd[1])), path.relative_to(ROOT).as_posix())
    entry = load_one(KUBERAY / "rayjob.yaml")["spec"]["entrypoint"]
    cmd = parse_command(entry)
    assert cmd, "rayjob.yaml's entrypoint runs no kpscale module"
    found.setdefault((cmd[0], tuple(cmd[1])), "cluster/kuberay/rayjob.yaml")
    return [(where, module, list(args)) for (module, args), where in found.items()]


COMMANDS = collect_commands()


def split_args(args: list[str], flags_with_value: set[str]) -> tuple[dict[str, str], list[str], list[str]]:
    """-> (flags, positionals, key=value overrides)."""
    flags, positional, overrides = {}, [], []
    it = iter(args)
    for a in it:
        if a.startswith("-"):
            name, sep, value = a.partition("=")
            assert name in flags_with_value, f"unknown flag {name}"
            flags[name] = value if sep else next(it)
        elif "=" in a:
            overrides.append(a)
        else:
            positional.append(a)
    return flags, positional, overrides


def local_data(overrides: list[str], tmp_path: Path) -> list[str]:
    """Shard paths on the cluster's claim cannot exist here: point them at an existing folder."""
    out = []
    for o in overrides:
        key, _, value = o.partition("=")
        if key in ("data.train", "data.test") and value.startswith(SHARED + "/"):
            o = f"{key}={tmp_path}"
        out.append(o)
    return out


def test_commands_were_found():
    modules = [m for _, m, _ in COMMANDS]
    assert modules.count("kpscale.train") >= 3 and modules.count("kpscale.tune") >= 2, COMMANDS


@pytest.mark.parametrize("where, module, args", COMMANDS,
                         ids=[f"{w}:{m}:{' '.join(a)[:60]}" for w, m, a in COMMANDS])
def test_kpscale_commands_are_valid(where, module, args, tmp_path):
    assert importlib.util.find_spec(module) and importlib.util.find_spec(module + ".__main__"), \
        f"{where}: python -m {module}: no such module"
    if module == "kpscale.train":
        from kpscale.train.config import load_train_config

        flags, positional, overrides = split_args(args, {"--config"})
        assert not positional, f"{where}: stray arguments {positional}"
        config = ROOT / flags["--config"] if "--config" in flags else None
        load_train_config(config, local_data(overrides, tmp_path))  # raises ConfigError on a bad key
    elif module == "kpscale.tune":
        from kpscale.tune.sweep import load_sweep

        flags, positional, overrides = split_args(args, {"--sweep"})
        assert not positional and "--sweep" in flags, f"{where}: needs --sweep FILE"
        load_sweep(ROOT / flags["--sweep"], local_data(overrides, tmp_path))
    elif module == "kpscale.data" and args[:1] == ["build"]:
        from kpscale.config import load
        from kpscale.data.card import DatasetCard

        flags, positional, overrides = split_args(args[1:], {"--out"})
        assert len(positional) == 1 and "--out" in flags, f"{where}: build CARD --out DIR"
        load(DatasetCard, ROOT / positional[0], overrides)


# ---------------------------------------------------------------- runtime environment

@pytest.fixture(scope="module")
def runtime_env() -> dict:
    return load_one(CLUSTER / "runtime_env.yaml")


def test_runtime_env_is_what_ray_job_submit_accepts(runtime_env):
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    assert set(runtime_env) <= RuntimeEnv.known_fields, set(runtime_env) - RuntimeEnv.known_fields
    # `pip: ["-e ."]` and friends: the image has the dependencies; the checkout comes as working_dir.
    assert not {"pip", "uv", "conda"} & set(runtime_env)
    env = parse_runtime_env_args(runtime_env=str(CLUSTER / "runtime_env.yaml"), working_dir=str(ROOT))
    RuntimeEnv(**env)  # Ray's own validation of each field
    assert all(isinstance(v, str) for v in env.get("env_vars", {}).values())


def test_working_dir_upload_holds_the_code_and_stays_small(runtime_env):
    # Walk the checkout as `ray job submit --working-dir .` packs it (Ray 2.60's helpers).
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    excludes = [*runtime_env.get("excludes", []), *ray_constants.get_runtime_env_default_excludes()]
    files = []
    _dir_travel(ROOT, [_get_excludes(ROOT, excludes)], lambda p: files.append(p) if p.is_file() else None,
                include_gitignore=True)
    names = {p.relative_to(ROOT).as_posix() for p in files}
    for needed in ("kpscale/__init__.py", "kpscale/data/stream.py", "kpscale/models/struct_vrnn/configs/basketball_cpu.yaml",
                   "kpscale/tune/sweep.py", "tuning/basketball.yaml", "datasets/basketball.yaml"):
        assert needed in names, f"{needed} would not be uploaded"
    for top in ("data/", "runs/", "mlruns/", ".venv/", ".git/"):
        assert not any(n.startswith(top) for n in names), f"{top} would be uploaded"
    assert "mlflow.db" not in names and "infra/mlflow/.env" not in names
    size = sum(p.stat().st_size for p in files)
    assert size < 100 * 2**20, f"working dir of {size / 2**20:.0f} MiB: over the dashboard's 100 MiB upload limit"


# ---------------------------------------------------------------- image

def test_one_image_name_everywhere():
    image = image_name()
    assert re.fullmatch(r"[a-z0-9.-]+(/[a-z0-9._-]+)+:[A-Za-z0-9._-]+", image), image
    assert f"-t {image} ." in DOCKERFILE.read_text(), "the Dockerfile's build command tags another name"
    readme = (CLUSTER / "README.md").read_text()
    assert f"docker build -f infra/Dockerfile -t {image} ." in readme and f"docker push {image}" in readme
    # No other image of ours anywhere in cluster/ (KubeRay images are checked in check_cluster_spec).
    for path in CLUSTER.rglob("*"):
        if path.is_file():
            for other in re.findall(r"ghcr\.io/[\w./-]+(?::[\w.-]+)?", path.read_text()):
                assert other == image, f"{path}: {other}"


def test_dockerfile_installs_the_gpu_stack():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM \S+", text, re.M)
    assert f"torch=={pin('torch')}" in text, "the image's torch differs from pyproject.toml's pin"
    assert re.search(r"torchcodec==0\.1[4-9]", text), "the image needs a CUDA build of torchcodec"
    assert "download.pytorch.org/whl/cu" in text, "torch from a CUDA index"
    assert "pyproject.toml" in text and "--no-deps ." in text, "the rest of the stack comes from pyproject.toml"
    instructions = re.sub(r"\\\n", " ", text).splitlines()  # continuation lines joined
    env = dockerfile_env()
    assert "video" in env["NVIDIA_DRIVER_CAPABILITIES"].split(",") and env["MUJOCO_GL"] == "egl"
    assert any(i.startswith("RUN ") and "apt-get install" in i and " ffmpeg " in i for i in instructions)


def test_dockerignore_keeps_the_context_small_and_the_sources_in():
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {"data", "runs", "mlruns", "mlflow.db", ".venv", ".git"} <= ignored
    for src in re.findall(r"^COPY (\S+) ", DOCKERFILE.read_text(), re.M):
        assert (ROOT / src).exists() and src.rstrip("/") not in ignored, f"COPY {src}"


# ---------------------------------------------------------------- MLflow server

@pytest.fixture(scope="module")
def compose() -> dict:
    return load_one(COMPOSE)


def flag(command: list[str] | str, name: str) -> str | None:
    args = shlex.split(command) if isinstance(command, str) else command
    for i, a in enumerate(args):
        if a == name:
            return args[i + 1] if i + 1 < len(args) else ""
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def test_compose_services(compose):
    services = compose["services"]
    assert {"postgres", "minio", "mlflow"} <= set(services)
    assert services["postgres"]["image"].split(":")[1].startswith("16")
    cmd = services["mlflow"]["command"]
    assert (flag(cmd, "--backend-store-uri") or "").startswith("postgresql://")
    assert (flag(cmd, "--artifacts-destination") or "").startswith("s3://") and "--serve-artifacts" in cmd
    assert flag(cmd, "--host") == "0.0.0.0"
    # The artifact bucket is the one the init container creates.
    bucket = flag(cmd, "--artifacts-destination").removeprefix("s3://").split("/")[0]
    init = [s for s in services.values() if "mb" in str(s.get("command", ""))]
    assert init and any(f"/{bucket}" in str(s["command"]) for s in init), f"no init container creates {bucket}"
    for name, svc in services.items():
        for dep in svc.get("depends_on") or {}:
            assert dep in services, f"{name} depends on unknown {dep}"
        if svc.get("restart", "no") != "no":
            assert "healthcheck" in svc, f"{name} has no healthcheck"
    for name in ("postgres", "minio"):
        assert "ports" not in services[name], f"{name} must not be published on the host"


def test_compose_access_control(compose):
    services = compose["services"]
    cmd = services["mlflow"]["command"]
    proxies = [n for n, s in services.items() if n != "mlflow" and s.get("ports") and "nginx" in str(s.get("image"))]
    if services["mlflow"].get("ports"):
        assert flag(cmd, "--app-name") == "basic-auth", "MLflow is published without authentication"
    else:
        assert proxies, "MLflow is reachable by nothing"
    if flag(cmd, "--app-name") == "basic-auth":
        env = services["mlflow"]["environment"]
        assert "MLFLOW_FLASK_SERVER_SECRET_KEY" in env and "MLFLOW_AUTH_ADMIN_PASSWORD" in env
        target = env["MLFLOW_AUTH_CONFIG_PATH"]
        source = next(c["source"] for c in services["mlflow"]["configs"] if c["target"] == target)
        ini = configparser.ConfigParser()
        ini.read_string(compose["configs"][source]["content"])
        assert ini["mlflow"]["database_uri"].startswith("postgresql://")
        assert ini["mlflow"]["default_permission"] in ("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS")


def test_compose_settings_are_documented(compose):
    text = COMPOSE.read_text()
    used = set(re.findall(r"\$\{(\w+)", text))
    example = set(re.findall(r"^(\w+)=", (MLFLOW / ".env.example").read_text(), re.M))
    assert used <= example, f"not in .env.example: {sorted(used - example)}"
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD"} <= required
    declared = set(compose.get("volumes") or {})
    for svc in compose["services"].values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (MLFLOW / src).exists(), src
            else:
                assert src in declared, f"volume {src} not declared"
        if "build" in svc:
            assert (MLFLOW / svc["build"] / "Dockerfile").exists()
    server = (MLFLOW / "Dockerfile").read_text()
    assert f"mlflow[auth]=={pin('mlflow')}" in server, "the server's MLflow differs from the clients' pin"
