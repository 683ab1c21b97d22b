"""A real on-premise Ray cluster on this machine, for testing ``ray up`` / ``ray submit`` / ``ray down``.

Ray's cluster launcher with ``provider: local`` reaches each node over SSH. Here
the nodes are two addresses of this machine, 127.0.0.1 (head) and 127.0.0.2
(worker), each served by an ``sshd`` of its own that this module starts with its
own host key and client key. Each node is kept apart, as two machines would be:

- **A PID namespace per node.** Each ``sshd`` runs under ``unshare --pid
  --mount-proc``, so every process the launcher starts over SSH on a node (Ray's
  daemons, the submitted driver, the actors) lives in that node's namespace.
  ``ray stop``, which ``ray up`` and ``ray down`` run on each node and which kills
  every Ray process it can see, then stops only that node's Ray: not the other
  node's, and not the test session's own. Killing a namespace's first process
  ends everything in it, whatever state the cluster is in.
- **A home per node.** Inside its namespace, root's home (``/etc/passwd``) is the
  node's own directory, whose ``.bashrc`` puts this checkout's virtualenv first on
  ``PATH`` (the pre-installed Python of an on-premise node) and keeps Ray's temp
  files there. The project itself reaches each home through the config's
  ``file_mounts`` and is installed there by its ``setup_commands``.

``python tests/local_cluster.py [BACKUP SWEEP ARGS]`` brings one up, runs a sweep through
``ray submit`` (by default a small one on tiny-gpt2) and takes it down again, printing
each step (for trying by hand).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
HEAD_IP, WORKER_IP = "127.0.0.1", "127.0.0.2"


def unavailable() -> str | None:
    """Why a local cluster cannot run here (None when it can)."""
    if os.geteuid() != 0:
        return "needs root: sshd must listen on port 22 (Ray's SSH has no port option) and set HOME per node"
    missing = [tool for tool in ("sshd", "rsync", "ssh-keygen", "unshare") if not _which(tool)]
    if missing:
        return (f"{', '.join(missing)} not installed (`apt-get install openssh-server rsync`; "
                ".ci/run installs them)")
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"cannot make a PID namespace (unshare: {probe.stderr.decode().strip() or probe.returncode})"
    for ip in (HEAD_IP, WORKER_IP):
        if _accepts(ip, 22):
            return f"port 22 on {ip} is taken (another sshd runs here)"
    return None


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")


def _accepts(ip: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((ip, port)) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HEAD_IP, 0))
        return s.getsockname()[1]


class LocalCluster:
    """sshd + a ``provider: local`` cluster config under ``workdir``; see the module docstring."""

    def __init__(self, workdir: Path, name: str | None = None, gpus_per_node: int = 1,
                 cpus_per_node: int = 2, workers: int = 1, dashboard: bool = False,
                 install_project: bool = True, venv: Path = ROOT / ".venv"):
        self.dir = Path(workdir)
        self.name = name or f"sweeps-test-{os.getpid()}"
        self.venv = venv
        self.key = self.dir / "id_ed25519"
        self.homes = {HEAD_IP: self.dir / "head"} | ({WORKER_IP: self.dir / "worker"} if workers else {})
        self.config_path = self.dir / "cluster-local.yaml"
        self.port = free_port()
        # The dashboard serves `ray job submit`; off unless asked for (it costs seconds and memory).
        self.dashboard_port = free_port() if dashboard else None
        self.gpus, self.cpus = gpus_per_node, cpus_per_node
        self.install_project = install_project  # False: the nodes have the dependencies only
        self.sshds: dict[str, subprocess.Popen] = {}
        self.log = self.dir / "launcher.log"
        # Ray's token, as `ray get-auth-token --generate` makes it on the user's machine;
        # the config mounts it on every node, as cluster.yaml does.
        self.token = self.dir / "auth_token"

    # --- sshd -------------------------------------------------------------------------------
    def start_sshd(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.token.write_text(secrets.token_hex(32))
        for key in (self.key, self.dir / "host_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        (self.dir / "authorized_keys").write_text(self.key.with_suffix(".pub").read_text())
        for ip, home in self.homes.items():
            home.mkdir(exist_ok=True)
            (home / "tmp").mkdir(exist_ok=True)
            (home / ".bashrc").write_text(
                "# an on-premise node: Python and the project's dependencies are pre-installed\n"
                f"export PATH={self.venv}/bin:$PATH\n"
                # pip --target installs of the mounted project (setup_commands) come first
                "export PYTHONPATH=$HOME/site-packages\n"
                "export RAY_TMPDIR=$HOME/tmp RAY_UP_enable_autoscaler_v2=0\n"
                "export RAY_USAGE_STATS_ENABLED=0\n")
        for ip in self.homes:
            self.sshds[ip] = self._start_node(ip)
        deadline = time.monotonic() + 10
        while not all(_accepts(ip, 22) for ip in self.homes):
            for ip, sshd in self.sshds.items():
                if sshd.poll() is not None or time.monotonic() > deadline:
                    log = self.dir / f"sshd-{ip}.log"
                    raise RuntimeError(f"sshd on {ip} did not start: {log.read_text()[-500:]}")
            time.sleep(0.1)

    def _start_node(self, ip: str) -> subprocess.Popen:
        """One node: an sshd on ``ip:22`` in a PID and mount namespace of its own, whose root
        has the node's home (``/etc/passwd`` bound over: ssh finds keys such as the head's
        ``~/ray_bootstrap_key.pem`` through it, not through ``$HOME``)."""
        home = self.homes[ip]
        config, passwd = self.dir / f"sshd-{ip}.config", self.dir / f"passwd-{ip}"
        config.write_text("\n".join([
            "Port 22", f"ListenAddress {ip}", f"HostKey {self.dir / 'host_key'}",
            f"PidFile {self.dir / f'sshd-{ip}.pid'}", f"AuthorizedKeysFile {self.dir / 'authorized_keys'}",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "UsePAM no", "StrictModes no", "MaxSessions 50", "MaxStartups 50:30:100", ""]))
        passwd.write_text("".join(
            ":".join(f[:5] + [str(home)] + f[6:]) if f[0] == "root" else line
            for line in Path("/etc/passwd").read_text().splitlines(keepends=True)
            for f in [line.split(":")]))
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
        return subprocess.Popen(
            ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "sh", "-c",
             'mount --bind "$1" /etc/passwd && exec "$2" -D -e -f "$3"', "sh", str(passwd), _which("sshd"),
             str(config)],
            stdout=subprocess.DEVNULL, stderr=open(self.dir / f"sshd-{ip}.log", "wb"), start_new_session=True)

    def stop(self) -> None:
        """End sshd and every process of the cluster (its whole PID namespace)."""
        for sshd in self.sshds.values():
            if sshd.poll() is None:
                os.killpg(sshd.pid, signal.SIGKILL)  # unshare --kill-child takes the namespace with it
                sshd.wait(10)

    # --- the cluster config ---------------------------------------------------------------------
    def config(self) -> dict:
        # Token authentication on every node, as cluster.yaml starts Ray.
        start = f"RAY_AUTH_MODE=token ray start --num-cpus={self.cpus} --num-gpus={self.gpus} --disable-usage-stats"
        # Two nodes on one machine (and this session's own Ray) must not share a node agent port;
        # on separate machines Ray's fixed defaults are fine.
        head_ports = f"--dashboard-agent-listen-port={free_port()} --ray-client-server-port={free_port()}"
        worker_ports = f"--dashboard-agent-listen-port={free_port()}"
        return {
            "cluster_name": self.name,
            "provider": {"type": "local", "head_ip": HEAD_IP, "worker_ips": [ip for ip in self.homes if ip != HEAD_IP]},
            "auth": {"ssh_user": "root", "ssh_private_key": str(self.key)},
            "min_workers": len(self.homes) - 1,
            "max_workers": len(self.homes) - 1,
            "upscaling_speed": 1.0,
            "idle_timeout_minutes": 10,
            # The project reaches each node as cluster.yaml's does: mounted, then installed.
            "file_mounts": {**({"~/interp-sweeps": str(ROOT)} if self.install_project else {}),
                            "~/.ray/auth_token": str(self.token)},
            "rsync_exclude": [".venv", ".git", "results", "reports", "wandb", "**/__pycache__", "*.egg-info"],
            "rsync_filter": [".gitignore"],
            "setup_commands": [
                "cd ~/interp-sweeps && python -m pip install -q --disable-pip-version-check --no-deps "
                "--upgrade --target ~/site-packages ."] if self.install_project else [],
            "head_start_ray_commands": [
                "ray stop",
                f"{start} --head --port={self.port} {head_ports} --autoscaling-config=~/ray_bootstrap_config.yaml "
                + (f"--dashboard-host={HEAD_IP} --dashboard-port={self.dashboard_port}" if self.dashboard_port
                   else "--include-dashboard=false"),
            ],
            "worker_start_ray_commands": [
                "ray stop",
                f"{start} --address=$RAY_HEAD_IP:{self.port} --node-ip-address={WORKER_IP} {worker_ports}",
            ],
        }

    def write_config(self) -> Path:
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        return self.config_path

    # --- the launcher ---------------------------------------------------------------------------
    def ray(self, *args: str, timeout: float = 120, token: bool = True) -> subprocess.CompletedProcess:
        """``ray ARGS`` as the user runs it on their own machine (its temp files kept here), holding
        the cluster's token (``token=False``: a stranger who can reach the head but has no token)."""
        tmp = str(self.dir / "launcher-tmp")  # Ray's state files and its config cache
        env = {**os.environ, "RAY_TMPDIR": tmp, "TMPDIR": tmp, "RAY_UP_enable_autoscaler_v2": "0",
               "RAY_USAGE_STATS_ENABLED": "0"}
        env.pop("RAY_AUTH_TOKEN", None)
        if token:
            env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token)}
        else:
            env |= {"RAY_AUTH_MODE": "disabled"}
            env.pop("RAY_AUTH_TOKEN_PATH", None)
        env.pop("RAY_ADDRESS", None)
        (self.dir / "launcher-tmp").mkdir(exist_ok=True)
        proc = subprocess.run([str(self.venv / "bin" / "ray"), *args], capture_output=True, text=True,
                              env=env, timeout=timeout)
        with open(self.log, "a") as log:
            log.write(f"$ ray {' '.join(args)}  (exit {proc.returncode})\n{proc.stdout}\n{proc.stderr}\n")
        return proc

    def up(self) -> None:
        proc = self.ray("up", "-y", "--no-config-cache", str(self.config_path))
        if proc.returncode != 0:
            raise RuntimeError(f"ray up failed (exit {proc.returncode}); see {self.log}")

    def wait_for_nodes(self, count: int = 2, timeout: float = 60) -> int:
        """Wait until ``count`` nodes have joined (the autoscaler starts the worker after ``ray up``)."""
        probe = ("import ray, time; ray.init(address='auto', logging_level='ERROR'); "
                 f"deadline = time.time() + {timeout}\n"
                 f"while len([n for n in ray.nodes() if n['Alive']]) < {count} and time.time() < deadline: "
                 "time.sleep(0.5)\n"
                 "print('NODES', len([n for n in ray.nodes() if n['Alive']]))")
        proc = self.ray("exec", str(self.config_path), f'python -c "{probe}"', timeout=timeout + 60)
        for line in proc.stdout.splitlines():
            if line.startswith("NODES "):
                return int(line.split()[1])
        raise RuntimeError(f"could not count the cluster's nodes; see {self.log}")

    def submit(self, script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """``ray submit CONFIG SCRIPT -- ARGS``; Ray exits 1 whatever the script did, so check results."""
        return self.ray("submit", str(self.config_path), str(ROOT / script), "--", *args, timeout=timeout)

    def job_submit(self, *entrypoint: str, timeout: float = 120, token: bool = True) -> subprocess.CompletedProcess:
        """``ray job submit --working-dir <this checkout> -- ENTRYPOINT`` through the head's dashboard.

        Right after ``ray up`` the head's job agent may not be up yet; Ray then says to try again
        later, which this does (for up to 30 s)."""
        deadline = time.monotonic() + 30
        while True:
            proc = self.ray("job", "submit", "--address", f"http://{HEAD_IP}:{self.dashboard_port}",
                            "--working-dir", str(ROOT), "--", *entrypoint, timeout=timeout, token=token)
            if "No available agent to submit job" not in proc.stderr or time.monotonic() > deadline:
                return proc
            time.sleep(2)

    def down(self) -> subprocess.CompletedProcess:
        return self.ray("down", "-y", str(self.config_path), timeout=60)


def main() -> int:
    import tempfile

    why = unavailable()
    if why:
        print(f"no local cluster here: {why}")
        return 1
    cluster = LocalCluster(Path(tempfile.mkdtemp(prefix="local-cluster-")))
    t0 = time.monotonic()

    def step(what: str) -> None:
        print(f"[{time.monotonic() - t0:5.1f}s] {what}", flush=True)

    try:
        cluster.start_sshd()
        step(f"sshd up; config {cluster.write_config()}")
        cluster.up()
        step("ray up done")
        step(f"{cluster.wait_for_nodes()} nodes")
        out = cluster.homes[HEAD_IP] / "results"
        args = sys.argv[1:] or ["--model", "tiny-gpt2", "--n-prompts", "6", "--heads", "L0,L1",
                                "--heads-per-shard", "1", "--no-report"]
        proc = cluster.submit("sweeps/backup.py", *args, "--out", str(out))
        step(f"ray submit exit {proc.returncode}; manifest: {(out / 'manifest.json').exists()}")
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        if (out / "manifest.json").exists():
            import json

            shards = json.loads((out / "manifest.json").read_text())["shards"]
            step(f"shards by node IP: {sorted(str(v['node_ip']) for v in shards.values())}")
        proc = cluster.down()
        step(f"ray down exit {proc.returncode}")
    finally:
        cluster.stop()
        step(f"stopped; log {cluster.log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
