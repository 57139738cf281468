"""A real single-node SLURM cluster with accounting, started and stopped by the tests themselves.

Every daemon (munged, MariaDB, slurmdbd, slurmctld, slurmd) runs as root with all its state under one
folder and on free ports, so it never clashes with a cluster someone else runs on the machine.

By hand (from the repo root):
    python -m tests.slurm_cluster start /tmp/slurm    # prints `export SLURM_CONF=...`
    python -m tests.slurm_cluster stop /tmp/slurm
"""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BINARIES = (
    "slurmctld",
    "slurmd",
    "slurmdbd",
    "munged",
    "mungekey",
    "sbatch",
    "sacctmgr",
    "mariadb-install-db",
    "mariadb",
)
STOP_ORDER = ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged")
LOGS = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")
START_TIMEOUT_S = 60.0
SOCKET_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL


def slurm_available() -> bool:
    return all(shutil.which(name) for name in BINARIES) and bool(shutil.which("mariadbd") or shutil.which("mysqld"))


def _free_ports(count: int) -> list[int]:
    # Hold all sockets open until every port is picked so the same port is not handed out twice.
    socks = [socket.socket() for _ in range(count)]
    for sock in socks:
        sock.bind(("", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


def _alive(pid: int) -> bool:
    # The daemons are not our children (they daemonize), so a dead one may linger as a zombie until its
    # parent reaps it: count that as gone.
    stat = Path(f"/proc/{pid}/stat")
    if not stat.exists():
        return False
    return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return f"--- {path}: missing"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"--- {path} (last {len(text)} lines)\n" + "\n".join(text)


class SlurmCluster:
    partition = "debug"
    cluster_name = "local"

    def __init__(self, folder: Path | None = None):
        self.folder = folder
        self.env: dict[str, str] = {}
        self._mariadbd: subprocess.Popen | None = None
        if folder is not None:
            self.env = {"SLURM_CONF": str(self.folder / "slurm.conf")}

    # Paths -----------------------------------------------------------------------------------------
    def _pid_file(self, daemon: str) -> Path:
        return self.folder / "run" / f"{daemon}.pid"

    def _log(self, daemon: str) -> Path:
        return self.folder / "log" / f"{daemon}.log"

    def logs_tail(self) -> str:
        return "\n".join(_tail(self._log(name)) for name in LOGS)

    # Start -----------------------------------------------------------------------------------------
    def start(self, folder: Path) -> None:
        self.folder = Path(folder).resolve()
        self.env = {"SLURM_CONF": str(self.folder / "slurm.conf")}
        for sub in ("run", "log", "state", "spool", "munge", "mysql"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        longest = self.folder / "munge" / "munge.socket.lock"
        if len(str(longest)) > SOCKET_PATH_MAX:
            raise ValueError(f"{self.folder} is too long for a unix socket path; use a shorter folder")
        self._deadline = time.monotonic() + START_TIMEOUT_S
        self._mysql_port, self._dbd_port, self._ctld_port, self._slurmd_port = _free_ports(4)
        try:
            self._start_munged()
            self._start_mariadb()
            self._start_slurm()
        except BaseException:
            self.stop()
            raise

    def _run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(cmd, env={**os.environ, **self.env}, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise RuntimeError(
                f"SLURM cluster in {self.folder}: {' '.join(cmd)} exited {result.returncode}\n"
                f"{result.stdout}{result.stderr}{self.logs_tail()}"
            )
        return result

    def _wait(self, what: str, ready) -> None:
        while not ready():
            if time.monotonic() > self._deadline:
                raise RuntimeError(
                    f"SLURM cluster in {self.folder}: timed out waiting for {what} "
                    f"({START_TIMEOUT_S:.0f} s)\n{self.logs_tail()}"
                )
            time.sleep(0.2)

    def _start_munged(self) -> None:
        munge = self.folder / "munge"
        key = munge / "munge.key"
        if not key.exists():
            self._run("mungekey", "--create", f"--keyfile={key}")
        # munged insists that every directory above its socket is executable by all, which pytest's 0700
        # tmp dirs are not; as root, --force turns that into a warning. Only root uses this cluster.
        self._run(
            "munged",
            "--force",
            f"--socket={munge / 'munge.socket'}",
            f"--key-file={key}",
            f"--pid-file={self._pid_file('munged')}",
            f"--log-file={self._log('munged')}",
            f"--seed-file={munge / 'munged.seed'}",
        )

    def _start_mariadb(self) -> None:
        datadir = self.folder / "mysql"
        self._mysql_socket = self.folder / "run" / "mysql.sock"
        # Small InnoDB files: the defaults write 110 MB per cluster.
        innodb = [
            "--innodb-log-file-size=8M",
            "--innodb-data-file-path=ibdata1:12M:autoextend",
            "--innodb-autoextend-increment=4",
        ]
        if not (datadir / "mysql").exists():
            # --user=root: the mysql user cannot enter the 0700 tmp dirs pytest makes.
            self._run(
                "mariadb-install-db",
                "--no-defaults",
                "--user=root",
                f"--datadir={datadir}",
                "--auth-root-authentication-method=socket",
                "--skip-test-db",
                *innodb,
            )
        binary = shutil.which("mariadbd") or shutil.which("mysqld")
        with self._log("mariadbd").open("a") as log:
            self._mariadbd = subprocess.Popen(
                [
                    binary,
                    "--no-defaults",
                    "--user=root",
                    f"--datadir={datadir}",
                    "--bind-address=127.0.0.1",
                    f"--port={self._mysql_port}",
                    f"--socket={self._mysql_socket}",
                    f"--pid-file={self._pid_file('mariadbd')}",
                    f"--log-error={self._log('mariadbd')}",
                    "--skip-name-resolve",
                    "--innodb-lock-wait-timeout=900",
                    *innodb,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

        def sql(statement: str, check: bool = True) -> subprocess.CompletedProcess:
            return self._run(
                "mariadb",
                "--no-defaults",
                f"--socket={self._mysql_socket}",
                "--user=root",
                "-e",
                statement,
                check=check,
            )

        self._wait("MariaDB", lambda: sql("SELECT 1", check=False).returncode == 0)
        self._db_password = secrets.token_hex(12)
        # IF NOT EXISTS / ALTER: a restart in an existing folder reuses the datadir.
        sql(
            "CREATE DATABASE IF NOT EXISTS slurm_acct_db; "
            f"CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1'; "
            f"ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{self._db_password}'; "
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
        )

    def _write_configs(self) -> None:
        host = socket.gethostname().split(".")[0]
        munge_socket = self.folder / "munge" / "munge.socket"
        cpus = os.cpu_count()
        mem_total_kb = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal:")
        )
        # Below what slurmd detects, or the node is marked invalid.
        real_memory_mb = int(mem_total_kb * 0.8 / 1024)
        # cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
        auth_info = f"socket={munge_socket},cred_expire=5"
        slurmdbd_conf = self.folder / "slurmdbd.conf"
        # slurmdbd reads slurmdbd.conf from the folder holding $SLURM_CONF and refuses it unless mode 600.
        slurmdbd_conf.write_text(f"""\
AuthType=auth/munge
AuthInfo={auth_info}
DbdHost=localhost
DbdPort={self._dbd_port}
SlurmUser=root
LogFile={self._log("slurmdbd")}
PidFile={self._pid_file("slurmdbd")}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={self._mysql_port}
StorageUser=slurm
StoragePass={self._db_password}
StorageLoc=slurm_acct_db
""")
        slurmdbd_conf.chmod(0o600)
        (self.folder / "slurm.conf").write_text(f"""\
ClusterName={self.cluster_name}
SlurmctldHost={host}
SlurmctldPort={self._ctld_port}
SlurmdPort={self._slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo={auth_info}
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, a job that asks for no memory takes the whole node's and jobs run one at a time.
DefMemPerCPU={real_memory_mb // cpus}
ReturnToService=2
# A job whose begin time passes (a requeued one) only starts on a scheduler pass: every 60 s by default.
SchedulerParameters=sched_interval=1
JobRequeue=1
PreemptType=preempt/none
KillWait=5
MinJobAge=300
StateSaveLocation={self.folder / "state"}
SlurmdSpoolDir={self.folder / "spool"}
SlurmctldPidFile={self._pid_file("slurmctld")}
SlurmdPidFile={self._pid_file("slurmd")}
SlurmctldLogFile={self._log("slurmctld")}
SlurmdLogFile={self._log("slurmd")}
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={self._dbd_port}
# Talking to slurmdbd, slurmctld and sacct take the munge socket from here, not from AuthInfo.
AccountingStoragePass={munge_socket}
NodeName={host} CPUs={cpus} RealMemory={real_memory_mb} State=UNKNOWN
PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _start_slurm(self) -> None:
        self._write_configs()
        self._run("slurmdbd")
        # slurmdbd takes a second or so before it accepts connections.
        self._wait(
            "slurmdbd (sacctmgr add cluster)",
            lambda: (
                self._run("sacctmgr", "-i", "add", "cluster", self.cluster_name, check=False).returncode == 0
                or self.cluster_name
                in self._run("sacctmgr", "-n", "-P", "list", "cluster", "format=cluster", check=False).stdout.split()
            ),
        )
        self._run("slurmctld")
        self._run("slurmd")
        self._wait(
            "the node to be idle (sinfo)", lambda: "idle" in self._run("sinfo", "-h", "-o", "%T", check=False).stdout
        )
        self._wait("sacct", lambda: self._run("sacct", "-n", check=False).returncode == 0)
        # A fresh slurmctld starts its first job only ~3 s after it comes up; pay that here, so that the first
        # test's job starts as promptly as the others and a broken job launch fails here with the logs.
        job_id = (
            self._run("sbatch", "--parsable", "--job-name=cluster-warmup", "-o", "/dev/null", "--wrap", "true")
            .stdout.strip()
            .split(";")[0]
        )
        self._wait(
            f"the warm-up job {job_id} to run",
            lambda: not self._run("squeue", "-h", "-j", job_id, "-o", "%T", check=False).stdout.strip(),
        )

    # Stop ------------------------------------------------------------------------------------------
    def stop(self) -> None:
        if self.folder is None:
            return
        # All pids are read first: slurmd deletes its pid file as soon as it gets SIGTERM.
        pids = {}
        for daemon in STOP_ORDER:
            pid_file = self._pid_file(daemon)
            if pid_file.exists():
                pid = int(pid_file.read_text().split()[0])
                # Checked so that a stale pid file never gets an unrelated process killed.
                if _alive(pid) and Path(f"/proc/{pid}/comm").read_text().strip() in (daemon, "mysqld"):
                    pids[daemon] = pid
        if self._mariadbd is not None and self._mariadbd.poll() is None and "mariadbd" not in pids:
            pids["mariadbd"] = self._mariadbd.pid  # started but had not written its pid file yet
        if "slurmctld" in pids and "slurmd" in pids:
            self._cancel_jobs()
        for daemon in STOP_ORDER:
            if daemon in pids:
                os.kill(pids[daemon], signal.SIGTERM)
                if not self._wait_gone(pids[daemon], 10.0):
                    os.kill(pids[daemon], signal.SIGKILL)
                    self._wait_gone(pids[daemon], 5.0)
            self._pid_file(daemon).unlink(missing_ok=True)
        if self._mariadbd is not None:
            self._mariadbd.wait()  # reap it: it is our child
            self._mariadbd = None

    def _cancel_jobs(self) -> None:
        # A job still running when slurmd goes would leave its slurmstepd and job processes behind.
        jobs = self._run("squeue", "-h", "-o", "%A", check=False).stdout.split()
        if not jobs:
            return
        self._run("scancel", *jobs, check=False)
        deadline = time.monotonic() + 15.0
        while self._run("squeue", "-h", "-o", "%A", check=False).stdout.split() and time.monotonic() < deadline:
            time.sleep(0.2)

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: python -m tests.slurm_cluster start|stop DIR", file=sys.stderr)
        return 2
    folder = Path(argv[1]).resolve()
    if argv[0] == "start":
        cluster = SlurmCluster()
        started = time.monotonic()
        cluster.start(folder)
        print(f"# SLURM up in {time.monotonic() - started:.1f} s, partition {cluster.partition}", file=sys.stderr)
        for name, value in cluster.env.items():
            print(f"export {name}={value}")
    else:
        SlurmCluster(folder).stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
