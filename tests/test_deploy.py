"""The files in deploy/ are valid for the tools that read them, and agree with the code.

The Kubernetes manifest is validated against the API schemas (kubernetes-validate,
strict: an unknown field fails); the systemd units with `systemd-analyze verify` and
`security --offline` where systemd is installed. Docker cannot build here, so the
Dockerfile and compose file are checked for what they promise: a multi-stage build,
a non-root user, a health check on /healthz, and commands and config keys that exist.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml
from slipstream.worker.cli import main as cli
from slipstream.worker.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
MANIFEST = DEPLOY / "kubernetes" / "slipstream.yaml"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))


def _require_command(argv: list[str]) -> None:
    """`argv` (after `slipstream`) names a real command whose options exist.

    `serve` is the sync server's command, which lives beside the worker's in the same
    CLI; until it is registered, only the name is checked.
    """
    name, *rest = argv
    if name not in cli.commands:
        if name == "serve":
            return
        raise AssertionError(f"`slipstream {name}` is not a command: {sorted(cli.commands)}")
    command = cli.commands[name]
    options = {o for p in command.params if isinstance(p, click.Option) for o in p.opts}
    for arg in rest:
        if arg.startswith("--"):
            assert arg in options, f"`slipstream {name}` has no option {arg}"


# --- Kubernetes ------------------------------------------------------------------------


def _manifests() -> list[dict]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def test_kubernetes_manifest_is_valid_against_the_api_schema() -> None:
    import kubernetes_validate

    docs = _manifests()
    assert {d["kind"] for d in docs} >= {"Deployment", "ConfigMap", "Service"}
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_kubernetes_validation_would_catch_a_typo() -> None:
    import kubernetes_validate

    doc = next(d for d in _manifests() if d["kind"] == "Deployment")
    doc["spec"]["template"]["spec"]["initContainers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, "1.30.0", strict=True)


def _worker_sidecar() -> tuple[dict, dict]:
    app = next(d for d in _manifests() if d["kind"] == "Deployment" and d["metadata"]["name"] == "app")
    pod = app["spec"]["template"]["spec"]
    sidecar = next(c for c in pod["initContainers"] if c["name"] == "slipstream")
    return app, sidecar


def test_kubernetes_worker_is_a_sidecar_with_probes_and_secrets() -> None:
    app, sidecar = _worker_sidecar()
    pod = app["spec"]["template"]["spec"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar beside the app container
    assert [c["name"] for c in pod["containers"]] == ["app"]
    assert app["spec"]["replicas"] == 1 and app["spec"]["strategy"]["type"] == "Recreate"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in sidecar["env"]}
    assert refs == {"APP_DATABASE_URL": "slipstream"}
    assert sidecar["securityContext"]["runAsUser"] != 0
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    _require_command(sidecar["args"])


def test_kubernetes_config_map_is_a_loadable_config_on_the_probed_port(tmp_path, monkeypatch) -> None:
    cm = next(d for d in _manifests() if d["kind"] == "ConfigMap")
    path = tmp_path / "slipstream.toml"
    path.write_text(cm["data"]["slipstream.toml"])
    monkeypatch.setenv("APP_DATABASE_URL", "postgresql://x@localhost/app")
    cfg = load_config(path)
    _, sidecar = _worker_sidecar()
    assert {p["containerPort"] for p in sidecar["ports"]} == {cfg.worker.http_port}


def test_kubernetes_sync_server_takes_its_secrets_from_the_secret() -> None:
    sync = next(d for d in _manifests() if d["metadata"]["name"] == "slipstream-sync"
                and d["kind"] == "Deployment")
    (container,) = sync["spec"]["template"]["spec"]["containers"]
    assert container["args"][0] == "serve"
    _require_command(container["args"])
    for env in container["env"]:
        assert "value" not in env, f"{env['name']} must come from the Secret, not the manifest"
        assert env["valueFrom"]["secretKeyRef"]["name"] == "slipstream"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


# --- systemd ---------------------------------------------------------------------------


def _runnable_copy(unit: Path, tmp_path: Path) -> Path:
    """The unit with ExecStart pointed at this environment's `slipstream` (verify checks
    that the binary exists) and the environment file optional (it is not installed here)."""
    exe = Path(sys.executable).with_name("slipstream")
    text = unit.read_text().replace("/opt/slipstream/bin/slipstream", str(exe))
    text = re.sub(r"^EnvironmentFile=", "EnvironmentFile=-", text, flags=re.MULTILINE)
    out = tmp_path / unit.name
    out.write_text(text)
    return out


@pytest.fixture
def systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed on this machine; the units are not verified")
    return exe


def test_there_are_units_for_the_worker_and_the_sync_server() -> None:
    names = {u.name for u in UNITS}
    assert names == {"slipstream-worker.service", "slipstream-sync.service"}
    commands = {}
    for unit in UNITS:
        (line,) = [ln for ln in unit.read_text().splitlines() if ln.startswith("ExecStart=")]
        argv = line.split()[1:]
        _require_command(argv)
        commands[unit.name] = argv[0]
    assert commands == {"slipstream-worker.service": "run", "slipstream-sync.service": "serve"}


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_systemd_unit_verifies_cleanly(unit: Path, tmp_path: Path, systemd_analyze: str) -> None:
    copy = _runnable_copy(unit, tmp_path)
    done = subprocess.run([systemd_analyze, "verify", str(copy)], check=False, capture_output=True, text=True,
                          timeout=60)
    # verify exits 0 for unknown keys and unparsable values, and only warns: any output fails.
    complaints = [ln for ln in (done.stdout + done.stderr).splitlines() if str(copy) in ln]
    assert done.returncode == 0 and not complaints, done.stdout + done.stderr


def test_systemd_verify_reports_a_misspelt_key(tmp_path: Path, systemd_analyze: str) -> None:
    copy = _runnable_copy(UNITS[0], tmp_path)
    copy.write_text(copy.read_text().replace("ProtectSystem=strict", "ProtectSystm=strict"))
    done = subprocess.run([systemd_analyze, "verify", str(copy)], check=False, capture_output=True, text=True,
                          timeout=60)
    assert "ProtectSystm" in done.stdout + done.stderr


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_systemd_unit_is_hardened(unit: Path, tmp_path: Path, systemd_analyze: str) -> None:
    copy = _runnable_copy(unit, tmp_path)
    done = subprocess.run([systemd_analyze, "security", "--offline=yes", str(copy)],
                          check=False, capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", done.stdout + done.stderr)
    if m is None:
        pytest.skip(f"this systemd-analyze has no offline security report: {done.stderr[:200]}")
    assert float(m.group(1)) <= 2.0, done.stdout  # systemd rates 0-10; below 2 is "OK"


# --- Docker ----------------------------------------------------------------------------


def _stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined), split by FROM."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    stages: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append([])
        stages[-1].append(line)
    return stages


def test_dockerfile_is_multi_stage_non_root_with_a_healthz_check() -> None:
    stages = _stages()
    assert len(stages) >= 2
    final = stages[-1]
    (user,) = [ln.split()[1] for ln in final if ln.startswith("USER ")]
    assert user.split(":")[0] not in ("0", "root")
    (check,) = [ln for ln in final if ln.startswith("HEALTHCHECK ")]
    assert "/healthz" in check
    assert not any(ln.startswith(("RUN pip", "RUN /opt/slipstream/bin/pip")) for ln in final), \
        "dependencies are installed in the build stage, not the runtime image"
    (entry,) = [ln for ln in final if ln.startswith("ENTRYPOINT ")]
    assert '"slipstream"' in entry
    (cmd,) = [ln for ln in final if ln.startswith("CMD ")]
    _require_command(yaml.safe_load(cmd[4:]))


def test_dockerfile_copies_only_what_exists() -> None:
    for stage in _stages():
        for line in stage:
            if line.startswith("COPY ") and "--from=" not in line:
                for src in line.split()[1:-1]:
                    assert (ROOT / src).exists(), f"{line}: {src} is not in the repository"


def test_compose_runs_postgres_for_logical_decoding_and_both_commands(monkeypatch) -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    db = services["db"]
    assert "pgvector" in db["image"]
    assert "wal_level=logical" in db["command"]
    assert services["worker"]["command"][0] == "run"
    assert services["sync"]["command"][0] == "serve"
    assert services["worker"]["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (DEPLOY / services["worker"]["build"]["context"] / "deploy" / "Dockerfile").exists()
    for name in ("worker", "sync"):
        _require_command(services[name]["command"])
        for mount in services[name]["volumes"]:
            src = mount.split(":")[0]
            assert (DEPLOY / src).exists(), f"{name} mounts {src}, which is not in deploy/"
    for mount in db["volumes"]:
        src = mount.split(":")[0]
        assert src.startswith("pgdata") or (DEPLOY / src).exists()
    monkeypatch.setenv("APP_DATABASE_URL", "postgresql://x@localhost/app")
    cfg = load_config(DEPLOY / "slipstream.compose.toml")
    assert f"{cfg.worker.http_port}:{cfg.worker.http_port}" in services["worker"]["ports"]
