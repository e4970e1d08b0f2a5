"""A real, private SLURM cluster on localhost for tests/test_slurm.py.

Debian's ``slurm-wlm`` and ``munge`` (``.ci/run`` installs them), configured in a temporary
folder: one munged with its own key and socket, one slurmctld and two slurmd on 127.0.0.1,
each slurmd playing one node (``slurmd -N n1``, ``-N n2``, distinct ports) with one CPU, so a
2-node job runs one task per 'node' exactly as on a real cluster. Every daemon runs in the
foreground as a child of the test process and is stopped by its PID; nothing is written
outside the temporary folder and the system's own munge and SLURM (if any) are not touched.

Settings chosen for a test cluster: ``proctrack/linuxproc`` and ``task/none`` (no cgroups
in containers), ``SlurmUser=root`` (the daemons run as the test's user), ``JobRequeue=1``,
``cred_expire=5`` (a requeued job may start again after 5 s instead of 120 s) and a scheduler
that looks at the queue every second.
"""

from __future__ import annotations

import os
import pathlib
import pwd
import random
import shutil
import socket
import subprocess
import tempfile
import time

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")
NODES = ("n1", "n2")
PLUGIN_DIRS = ("/usr/lib/x86_64-linux-gnu/slurm-wlm", "/usr/lib/aarch64-linux-gnu/slurm-wlm",
               "/usr/lib64/slurm", "/usr/lib/slurm")


def why_unavailable() -> str | None:
    """None when a local cluster can be started here, else the reason (for pytest.skip)."""
    missing = [p for p in DAEMONS + CLIENTS if shutil.which(p) is None]
    if missing:
        return (f"SLURM daemons not installed ({', '.join(missing)} missing): "
                "apt-get install slurm-wlm munge (.ci/run does this when it runs as root)")
    if os.geteuid() != 0:
        return "the SLURM daemons (slurmd launches jobs) need root; run the tests as root"
    return None


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalCluster:
    """start() brings up munged, slurmctld and one slurmd per node; stop() ends them by PID."""

    def __init__(self) -> None:
        # A short path: the munge socket's path must fit in a sockaddr_un (108 bytes).
        self.root = pathlib.Path(tempfile.mkdtemp(prefix="itop-slurm-", dir="/tmp"))
        self.root.chmod(0o755)  # munged wants its socket's folder open to all (x)
        self.conf = self.root / "slurm.conf"
        self.logs = self.root / "log"
        self.procs: dict[str, subprocess.Popen] = {}
        base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        self.env = {**base, "SLURM_CONF": str(self.conf)}

    # -- setup ---------------------------------------------------------------------------------
    def _write_config(self) -> None:
        munge = self.root / "munge"
        for d in (munge, self.logs, self.root / "state", *(self.root / "spool" / n for n in NODES)):
            d.mkdir(parents=True, exist_ok=True)
        munge.chmod(0o755)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        plugins = next((d for d in PLUGIN_DIRS if pathlib.Path(d, "select_cons_tres.so").exists()), None)
        host = socket.gethostname().split(".")[0]
        ctld_port, *node_ports = free_ports(1 + len(NODES))
        r = self.root
        lines = [
            "ClusterName=itoptest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={munge / 'munge.socket'},cred_expire=5",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.logs / 'slurmctld.log'}",
            f"SlurmdLogFile={self.logs / 'slurmd-%n.log'}",
            "SlurmctldDebug=info", "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=1,bf_interval=1",
            # Job ids (and so the launcher's ports, 15000 + id % 15000) unlike another test
            # cluster's running beside this one.
            f"FirstJobId={random.randint(1000, 9_000_000)}",
            "MpiDefault=none", "JobRequeue=1", "ReturnToService=2",
            "KillWait=30", "InactiveLimit=0", "MinJobAge=600",
            *([f"PluginDir={plugins}"] if plugins else []),
            *(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs=1 Sockets=1 "
              "CoresPerSocket=1 ThreadsPerCore=1 State=UNKNOWN" for n, p in zip(NODES, node_ports)),
            f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.logs / f"{name}.stdout", "w")  # noqa: SIM115 - kept open while it runs
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    def start(self, timeout: float = 60) -> None:
        self._write_config()
        m = self.root / "munge"
        self._spawn("munged", ["munged", "--foreground", f"--socket={m / 'munge.socket'}",
                               f"--key-file={m / 'munge.key'}", f"--pid-file={m / 'munged.pid'}",
                               f"--log-file={self.logs / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"])
        self._until(lambda: (m / "munge.socket").exists(), 15, "munged did not create its socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._until(lambda: self.run("scontrol", "ping", check=False).returncode == 0, timeout,
                    "slurmctld does not answer")
        for n in NODES:
            self._spawn(f"slurmd-{n}", ["slurmd", "-D", "-N", n, "-f", str(self.conf)])
        self._until(self._nodes_idle, timeout, "the nodes did not come up idle")

    def _nodes_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
        return dict(zip(out[::2], out[1::2])) == {n: "idle" for n in NODES}

    def _until(self, ok, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited: {what}\n{self.log_tail()}")
            if ok():
                return
            time.sleep(0.3)
        raise RuntimeError(f"{what} within {timeout:.0f} s\n{self.log_tail()}")

    # -- use -----------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env)
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def log_tail(self, chars: int = 3000) -> str:
        parts = []
        for f in sorted(self.logs.glob("*")):
            text = f.read_text(errors="replace")[-chars:]
            if text.strip():
                parts.append(f"--- {f.name}\n{text}")
        return "\n".join(parts)

    # -- teardown ------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel what is left, end every daemon by its PID (SIGTERM, then SIGKILL), clean up."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "-u", pwd.getpwuid(os.geteuid()).pw_name, check=False)
            end = time.monotonic() + 45
            while time.monotonic() < end and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        for name in [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]:
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        shutil.rmtree(self.root, ignore_errors=True)
