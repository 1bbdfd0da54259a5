"""Every ```python block of README.md runs as written, as a reader runs it.

Each block is its own ``python`` process (this venv's interpreter) in one directory, beside the
echo server the README tells the reader to start: the README's own
``quic-supervisor serve --cert-dir certs --listen ...`` command, run here in that directory on a
free port (``/udp/0/``). The blocks name the README's port (4433); the test rewrites that port
in the block's text before running it, so the README stays copy-pasteable and the test never
needs a fixed port. A block that imports ``supervisor.remote.fleet`` runs against a local Ray
cluster started here (``RAY_ADDRESS``), as a reader's ``ray start --head`` would be found.
``<!-- readme-test: skip (REASON) -->`` right before a block skips it, with that reason in the
test summary. A block must exit 0 within its timeout; on failure its stdout and stderr are shown.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.rig.waiting import poll_until_sync
from tests.support import stop_process

README = Path(__file__).resolve().parent.parent / "README.md"
SCRIPT = Path(sys.executable).with_name("quic-supervisor")

#: How long one block may run (a Ray block also waits for its agent's worker to start).
BLOCK_TIMEOUT_S = 60.0
RAY_BLOCK_TIMEOUT_S = 120.0

_FENCE = re.compile(r"^```(\S*)\s*$")
_SKIP = re.compile(r"^<!--\s*readme-test:\s*skip\s*\((?P<reason>.+)\)\s*-->\s*$")
_SERVE = re.compile(r"`(quic-supervisor serve --cert-dir \S+ --listen \S+)`")
_LISTENING = re.compile(r"^listening on (/ip4/127\.0\.0\.1/udp/(\d+)/quic-v1)\b", re.MULTILINE)


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it starts (1-based line of its fence) and its text."""

    line: int
    lang: str
    code: str
    skip: str | None = None

    @property
    def needs_ray(self) -> bool:
        return "supervisor.remote.fleet" in self.code


def extract_blocks(text: str, lang: str = "python") -> list[Block]:
    """The ``lang`` blocks of a Markdown text, in order; a skip marker on the last non-blank
    line before a block's fence applies to it."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match or not match.group(1):
            i += 1
            continue
        start = i
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"line {start + 1}: code block never closed")
        if match.group(1) == lang:
            before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            skip = _SKIP.match(before.strip())
            blocks.append(
                Block(
                    line=start + 1,
                    lang=lang,
                    code="\n".join(lines[start + 1 : end]) + "\n",
                    skip=skip.group("reason") if skip else None,
                )
            )
        i = end + 1
    return blocks


@dataclass(frozen=True)
class ServeCommand:
    """The README's server command, where it stands and the port its blocks then dial."""

    line: int
    argv: list[str]
    port: int


def serve_command(text: str) -> ServeCommand:
    """The first ``quic-supervisor serve --cert-dir DIR --listen ADDR`` the README gives in
    backticks (later mentions may abbreviate it)."""
    for number, line in enumerate(text.splitlines(), 1):
        if match := _SERVE.search(line):
            argv = shlex.split(match.group(1))
            listen = argv[argv.index("--listen") + 1]
            port = re.fullmatch(r"/ip4/127\.0\.0\.1/udp/(\d+)/quic-v1", listen)
            assert port, f"README.md:{number}: the server listens on {listen}, not on loopback"
            return ServeCommand(number, argv, int(port.group(1)))
    raise AssertionError(
        "README.md names no `quic-supervisor serve --cert-dir DIR --listen ...` command: the "
        "blocks need a server the reader can start"
    )


def run_block(
    code: str, cwd: Path, env: Mapping[str, str], timeout: float, name: str
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` as ``python NAME.py`` in ``cwd``; fail the test unless it exits 0 in time."""
    script = cwd / f"{name}.py"
    script.write_text(code)
    try:
        proc = subprocess.run(
            [sys.executable, script.name],
            cwd=cwd,
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"{name} still running after {timeout:.0f} s\n--- stdout\n{_text(exc.stdout)}"
            f"\n--- stderr\n{_text(exc.stderr)}"
        )
    if proc.returncode != 0:
        pytest.fail(
            f"{name} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
        )
    return proc


def _text(out: str | bytes | None) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")


def block_env() -> dict[str, str]:
    """The caller's environment without what would change a block's behaviour here (an OTLP
    exporter of the caller's, a key log, another Ray cluster and its authentication)."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("OTEL_") and k not in ("SSLKEYLOGFILE", "RAY_ADDRESS", "RAY_AUTH_MODE")
    }


README_TEXT = README.read_text()
BLOCKS = extract_blocks(README_TEXT)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reader's directory: the server keeps ``certs/`` here, every block runs here."""
    return tmp_path_factory.mktemp("readme")


@dataclass(frozen=True)
class Server:
    port: int
    command: list[str]


@pytest.fixture(scope="module")
def readme_server(workdir: Path) -> Iterator[Server]:
    """The README's ``quic-supervisor serve --cert-dir ...``, run in ``workdir`` on a free port."""
    if not SCRIPT.exists():
        pytest.skip(f"{SCRIPT} missing: run .venv/bin/pip install -e '.[dev,cli]'")
    cmd = serve_command(README_TEXT)
    argv = [str(SCRIPT), *cmd.argv[1:]]
    argv[argv.index("--listen") + 1] = "/ip4/127.0.0.1/udp/0/quic-v1"
    out, err = workdir / "serve.out", workdir / "serve.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(argv, cwd=workdir, stdout=stdout, stderr=stderr, text=True)
    try:
        poll_until_sync(
            lambda: _LISTENING.search(out.read_text()) or proc.poll() is not None,
            timeout=30,
            what="quic-supervisor serve printing 'listening on'",
        )
        listening = _LISTENING.search(out.read_text())
        assert listening, (
            f"{shlex.join(argv)} did not start (exit {proc.poll()})\n--- stdout\n"
            f"{out.read_text()}\n--- stderr\n{err.read_text()}"
        )
        assert (workdir / "certs" / "cert.pem").is_file(), "no certs/cert.pem beside the server"
        yield Server(int(listening.group(2)), argv)
    finally:
        stop_process(proc)


@dataclass(frozen=True)
class RayCluster:
    address: str
    auth_mode: str


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    """A fresh local Ray cluster (never one already running here), as ``ray start --head``."""
    ray = pytest.importorskip(
        "ray", reason="the ray extra is not installed: pip install -e '.[ray]'"
    )
    saved = dict(os.environ)  # ray.init sets RAY_AUTH_MODE, PYTHONBREAKPOINT... in this process
    ray.init(
        address="local",
        include_dashboard=False,
        num_cpus=2,
        namespace=f"qs-readme-{uuid.uuid4().hex[:8]}",
        logging_level="warning",
        log_to_driver=False,
    )
    try:
        # Ray 2.60 turns token authentication on for a cluster ray.init starts. A reader's
        # `connect(address="auto")` finds the local cluster and its token by itself; the block
        # here is pointed at this cluster by RAY_ADDRESS, an explicit address, for which Ray
        # sends the token only when RAY_AUTH_MODE says so.
        yield RayCluster(
            str(ray.get_runtime_context().gcs_address), os.environ.get("RAY_AUTH_MODE", "")
        )
    finally:
        for actor in ray.util.list_named_actors(all_namespaces=True):  # the blocks' agents
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)


# ----------------------------------------------------------------------------- the blocks


def _param(block: Block) -> object:
    marks = (
        [pytest.mark.ray, pytest.mark.timeout(RAY_BLOCK_TIMEOUT_S + 60)] if block.needs_ray else []
    )
    return pytest.param(block, id=f"README.md:{block.line}", marks=marks)


@pytest.mark.parametrize("block", [_param(b) for b in BLOCKS])
def test_readme_block_runs(block: Block, workdir: Path, request: pytest.FixtureRequest) -> None:
    """The block, as printed (but for the server's port), exits 0 against a real server."""
    if block.skip is not None:
        pytest.skip(f"README.md:{block.line}: {block.skip}")
    env = block_env()
    code = block.code
    cmd = serve_command(README_TEXT)
    readme_port = f"/udp/{cmd.port}/"
    if readme_port in code:
        assert cmd.line < block.line, (
            f"README.md:{block.line} dials the server of `{shlex.join(cmd.argv)}`, which the "
            f"README introduces only at line {cmd.line}, after the block"
        )
        server: Server = request.getfixturevalue("readme_server")
        code = code.replace(readme_port, f"/udp/{server.port}/")
    if block.needs_ray:
        cluster: RayCluster = request.getfixturevalue("ray_cluster")
        env["RAY_ADDRESS"] = cluster.address
        if cluster.auth_mode:
            env["RAY_AUTH_MODE"] = cluster.auth_mode
    timeout = RAY_BLOCK_TIMEOUT_S if block.needs_ray else BLOCK_TIMEOUT_S
    run_block(code, workdir, env, timeout, f"readme_{block.line}")


def test_readme_has_python_blocks() -> None:
    """The parametrised test above is not vacuous: it sees every python fence of the README."""
    fences = re.findall(r"^```\s*python", README_TEXT, re.MULTILINE | re.IGNORECASE)
    assert len(BLOCKS) == len(fences) >= 1


# ----------------------------------------------------------------------------- the harness


def test_extract_blocks_lines_languages_and_skip_markers() -> None:
    text = "\n".join(
        [
            "# T",  # 1
            "```python",  # 2
            "print(1)",  # 3
            "```",  # 4
            "```sh",  # 5
            "echo no",  # 6
            "```",  # 7
            "<!-- readme-test: skip (needs a Kubernetes cluster) -->",  # 8
            "",  # 9
            "```python",  # 10
            "import k8s",  # 11
            "```",  # 12
        ]
    )
    blocks = extract_blocks(text)
    assert [(b.line, b.code, b.skip) for b in blocks] == [
        (2, "print(1)\n", None),
        (10, "import k8s\n", "needs a Kubernetes cluster"),
    ]
    with pytest.raises(ValueError, match="line 1: code block never closed"):
        extract_blocks("```python\nprint(1)\n")


def test_a_failing_block_fails_with_its_output(tmp_path: Path) -> None:
    code = "import sys\nprint('to stdout')\nsys.exit('to stderr')\n"
    with pytest.raises(pytest.fail.Exception) as failed:
        run_block(code, tmp_path, block_env(), BLOCK_TIMEOUT_S, "bad")
    assert "bad exited 1" in str(failed.value)
    assert "to stdout" in str(failed.value) and "to stderr" in str(failed.value)


def test_a_hanging_block_fails_at_its_timeout(tmp_path: Path) -> None:
    code = "import threading\nprint('started', flush=True)\nthreading.Event().wait()\n"
    with pytest.raises(pytest.fail.Exception, match=r"(?s)hang still running after 2 s.*started"):
        run_block(code, tmp_path, block_env(), 2.0, "hang")


def test_serve_command_is_found_and_names_its_port() -> None:
    cmd = serve_command(
        "x\n`quic-supervisor serve --cert-dir c --listen /ip4/127.0.0.1/udp/4433/quic-v1`\n"
    )
    assert (cmd.line, cmd.argv[2:4], cmd.port) == (2, ["--cert-dir", "c"], 4433)
    with pytest.raises(AssertionError, match="no `quic-supervisor serve --cert-dir"):
        serve_command("no server here")
