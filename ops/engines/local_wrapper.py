"""Runs one command for the local engine and records how it ended in RUN_DIR/exit_status.json.

    python -m ops.engines.local_wrapper RUN_DIR [--tee] -- COMMAND...

--tee also copies the output into RUN_DIR/log.txt (containers, whose stdout goes elsewhere).

`ops cancel` signals the whole process group; the wrapper lets the signal reach the run (which
checkpoints and exits) and stays alive to record its exit status. Kept free of heavy imports, and
of the project's: nothing here imports `diffusion` (not even diffusion.records, through ops.rundir),
so that a working tree that no longer imports cannot stop it recording the end, and the only
`diffusion` a run's processes import is the one the run itself runs.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

EXIT_FILE = "exit_status.json"  # in RUN_DIR: the run's exit code and end time (the local engine reads it)
LOG = "log.txt"  # diffusion.records.LOG, spelled here: see the docstring


def main(argv: list[str]) -> int:
    run_dir, *rest = argv
    tee = rest[0] == "--tee"
    separator, *cmd = rest[1:] if tee else rest
    assert separator == "--" and cmd, "usage: python -m ops.engines.local_wrapper RUN_DIR [--tee] -- COMMAND..."
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        # A handler, not SIG_IGN: ignored signals would stay ignored in the child after exec.
        signal.signal(signum, lambda *args: None)
    if tee:
        returncode = run_teeing(cmd, Path(run_dir) / LOG)
    else:
        returncode = subprocess.Popen(cmd).wait()
    # Written atomically by hand, not with diffusion.records.write_json: see the docstring.
    path = Path(run_dir) / EXIT_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"returncode": returncode, "finished_at": time.time()}) + "\n")
    os.replace(tmp, path)
    print(f"[ops] run exited with code {returncode}", flush=True)
    return 0


def run_teeing(cmd: list[str], log_path: Path) -> int:
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    with log_path.open("ab") as log:
        for line in child.stdout:
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
            log.write(line)
            log.flush()
    return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
