"""Trackers people already use, mirroring what a run logs: TensorBoard event files in
RUN_DIR/tensorboard/ (the `tensorboard` extra) and trackio (the `trackio` extra, a local
dashboard), switched on by train.trackers (a spec, or ops.yaml's `trackers` for a project). Off by
default and never needed: metrics.jsonl and samples/ stay the record, and a tracker only mirrors
each logged metrics line (scalars) and each sample grid (images) or text preview.

    tensorboard --logdir runs/ID/tensorboard            # one run
    tensorboard --logdir_spec a:runs/A/tensorboard,b:runs/B/tensorboard   # chosen runs side by side
    trackio show --project diffusion                    # every run that logged to trackio
"""

from pathlib import Path

import numpy as np
from PIL import Image

from diffusion.records import MetricsRecord

TENSORBOARD_DIR = "tensorboard"
TRACKIO_PROJECT = "diffusion"


class Trackers:
    """The trackers `names` of the run in `run_dir`; `config`: the run's config (trackio shows it);
    `resume_step`: where a resumed run continues (TensorBoard drops events logged after it)."""

    def __init__(self, names: list[str], run_dir: Path, config: dict, resume_step: int = 0):
        self.tensorboard = self.trackio = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter  # the tensorboard extra: only when switched on

            self.tensorboard = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=resume_step or None)
        if "trackio" in names:
            import trackio  # the trackio extra, as above

            self.trackio = trackio
            trackio.init(project=TRACKIO_PROJECT, name=run_dir.name, config=config, resume="allow")

    def scalars(self, record: MetricsRecord) -> None:
        values = {
            key: value
            for key, value in record.to_json().items()
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)
        }
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, record.step)
            self.tensorboard.flush()
        if self.trackio is not None:
            self.trackio.log(values, step=record.step)

    def picture(self, tag: str, written: dict, step: int) -> None:
        """A sample grid or scatter (`write_samples`' record: grid, scatter or texts) at `step`."""
        if self.tensorboard is None and self.trackio is None:
            return
        image = written.get("grid") or written.get("scatter")
        if image is not None:
            pixels = np.asarray(Image.open(image).convert("RGB"))
            if self.tensorboard is not None:
                self.tensorboard.add_image(tag, pixels, step, dataformats="HWC")
            if self.trackio is not None:
                self.trackio.log({tag: self.trackio.Image(pixels)}, step=step)
        elif written.get("texts") is not None:
            text = "\n\n".join(written["texts"][:8])
            if self.tensorboard is not None:
                self.tensorboard.add_text(tag, text, step)
            if self.trackio is not None:
                self.trackio.log({tag: text}, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.trackio is not None:
            self.trackio.finish()
