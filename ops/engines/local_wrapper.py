"""Runs one command for the local engine and records how it ended in RUN_DIR/exit_status.json.

    python -m ops.engines.local_wrapper RUN_DIR -- COMMAND...

`ops cancel` signals the whole process group; the wrapper lets the signal reach the run (which
checkpoints and exits) and stays alive to record its exit status. Kept free of heavy imports.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    run_dir, separator, *cmd = argv
    assert separator == "--" and cmd, "usage: python -m ops.engines.local_wrapper RUN_DIR -- COMMAND..."
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        # A handler, not SIG_IGN: ignored signals would stay ignored in the child after exec.
        signal.signal(signum, lambda *args: None)
    child = subprocess.Popen(cmd)
    returncode = child.wait()
    status = {"returncode": returncode, "finished_at": time.time()}
    path = Path(run_dir) / "exit_status.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(status) + "\n")
    os.replace(tmp, path)
    print(f"[ops] run exited with code {returncode}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
