"""What a SLURM task runs (pickled by submitit): `python -m diffusion RUN_DIR`, in process.

The code is the snapshot made at submit (RUN_DIR/code: the recorded commit plus diff.patch), put
first on sys.path before `diffusion` is imported, so a job that waits in the queue runs what was
submitted, not what the working tree holds when it starts.

Preemption and time limits: SLURM sends SIGUSR2 (`--signal`, `scancel --signal=USR2`); the
trainer checkpoints after the current step and returns 75. The task then raises SIGUSR2 again
for submitit's own handler (restored when the trainer's returns), which requeues the job;
the requeued job resumes from latest.pt. Kept free of heavy imports at module level.
"""

import os
import signal
import sys
from pathlib import Path

EXIT_PREEMPTED = 75


class SlurmRun:
    def __init__(self, run_dir: str, code_dir: str | None):
        self.run_dir = run_dir
        self.code_dir = code_dir

    def __call__(self) -> int:
        # Imported here: submitit is heavy for the CLI that pickles this class, and `diffusion` must
        # come from the code snapshot, which goes first on sys.path only now.
        import submitit

        if self.code_dir:
            sys.path.insert(0, self.code_dir)
        environment = submitit.JobEnvironment()
        if environment.num_tasks > 1:
            # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT for torch.distributed (env://).
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        from diffusion.__main__ import main

        code = main([self.run_dir])
        if code == 0:
            # Complete: a preemption or time-limit signal from now on must not requeue or fail it
            # (submitit's handler would, while it saves the result).
            for signum in (signal.SIGUSR1, signal.SIGUSR2):
                signal.signal(signum, signal.SIG_IGN)
        if code == EXIT_PREEMPTED and environment.global_rank == 0 and stopped_by(self.run_dir) == "SIGTERM":
            # scancel, `scontrol requeue`, or a preemption with the default signal: SLURM decides what
            # comes next, not a requeue by us. Either way nothing is lost; no traceback for it.
            print(
                f"[ops] checkpointed on SIGTERM: SLURM is cancelling or requeueing job "
                f"{os.environ.get('SLURM_JOB_ID', '?')}; a requeued job resumes from this checkpoint, a cancelled "
                "one with `ops resume`",
                flush=True,
            )
            return code
        if code == EXIT_PREEMPTED:
            print(
                f"[ops] checkpointed at a preemption signal; requeueing (restart "
                f"{os.environ.get('SLURM_RESTART_COUNT', '0')})",
                flush=True,
            )
            os.kill(os.getpid(), signal.SIGUSR2)  # submitit's handler requeues (rank 0) and exits
            return code
        if code != 0:
            raise RuntimeError(f"python -m diffusion {self.run_dir} exited with code {code}; see its log above")
        return code

    def checkpoint(self):
        """Called by submitit when the signal arrives outside training (before it started):
        nothing to save, run the same thing again."""
        import submitit  # heavy, as in __call__

        return submitit.helpers.DelayedSubmission(SlurmRun(self.run_dir, self.code_dir))


def stopped_by(run_dir: str) -> str | None:
    """The signal that stopped the trainer, from its summary.json."""
    from ops.rundir import read_summary  # imports diffusion: only after __call__ put the snapshot on sys.path

    summary = read_summary(Path(run_dir))
    return summary.signal if summary else None
