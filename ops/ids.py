"""Readable ops ids: the spec's name, the values this run changes, and a random tail.

`mnist-training` with `--set run.train.lr=1e-4 --set run.train.epochs=50` becomes
`mnist-training-lr1e-4-ep50-3f2a`: a reader of `ops list` sees what each run was without opening it.
The id is a Vertex label value and a SLURM job name, so it keeps to lowercase letters, digits and
dashes and to MAX_LENGTH characters; when the changes do not fit, the ones that fit are kept in
order and the rest are left to job.json. Only the run's own settings (`run.*`) count: where it runs
(engine, resources) is in `ops list`'s engine column. The random tail keeps two runs of the same values apart
(the run dir's mkdir is what makes an id unique). A secret value never enters an id.
"""

import re
import secrets

from ops.secrets import secret_setting

MAX_LENGTH = 63  # a Vertex label value
TAIL_HEX = 4  # the random tail: 2 bytes, 4 hex digits
# Short names of the settings researchers change most; any other key goes by its last part.
SHORT_KEYS = {
    "epochs": "ep",
    "batch_size": "bs",
    "max_steps": "steps",
    "max_minutes": "min",
    "num_inference_steps": "nfe",
    "guidance_scale": "w",
    "num_samples": "n",
    "warmup_steps": "warm",
    "ema_decay": "ema",
    "base_channels": "ch",
    "hidden_dim": "hid",
    "num_layers": "layers",
    "dropout": "drop",
    "weight_decay": "wd",
    "coupling_group_size": "otgroup",
}
# Values that name themselves (a dataset, a sampler, an engine): the value alone says it.
SELF_NAMING = {"dataset", "sampler", "name", "engine", "task", "device", "time_sampling", "beta_schedule", "coupling"}


def number(value: float | int) -> str:
    """The shorter of the fixed and the scientific form: 1e-4, 0.5, 50, 2e5; a dot becomes 'p'."""
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e5:
        fixed = str(int(value))
    else:
        fixed = repr(float(value)) if "e" not in repr(float(value)) else ""
    mantissa, exponent = f"{float(value):e}".split("e")
    scientific = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    text = fixed if fixed and len(fixed) <= len(scientific) else scientific
    return text.replace(".", "p").replace("+", "")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def describe(key: str, value) -> str:
    """One change as an id part: `lr1e-4`, `ep50`, `moons`, `nocompile`, `mults1x2x2`."""
    short = SHORT_KEYS.get(key.rsplit(".", 1)[-1], key.rsplit(".", 1)[-1].replace("_", ""))
    if key.startswith("run.eval."):  # eval.num_samples is not sample.num_samples
        short = f"eval{short}"
    if isinstance(value, bool):
        return short if value else f"no{short}"
    if isinstance(value, int | float):
        return f"{short}{number(value)}"
    if value is None:
        return f"{short}none"
    if isinstance(value, list):
        return f"{short}" + "x".join(
            number(item) if isinstance(item, int | float) else slug(str(item)) for item in value
        )
    text = slug(str(value))
    return text if key.rsplit(".", 1)[-1] in SELF_NAMING else f"{short}-{text}"


# Run settings that change how a run reports, not what it computes.
NOT_COMPUTED = {"run.expect", "run.train.trackers", "run.train.progress", "run.train.log_every"}
SECTION_ORDER = {"task": 0, "data": 1, "model": 2, "method": 3, "train": 4, "sample": 5, "eval": 6}


def readable_id(name: str, changes: list[tuple[str, object, object]], tail: str | None = None) -> str:
    """`name-part-part-tail` for changes (key, spec value, run value); at most MAX_LENGTH characters."""
    tail = tail or secrets.token_hex(TAIL_HEX // 2)
    room = MAX_LENGTH - len(name) - len(tail) - 2
    parts = []
    # What is trained before how it is sampled and scored: the first to go when room runs out are the last.
    ordered = sorted(
        changes, key=lambda change: SECTION_ORDER.get(change[0].split(".")[1:2][0] if "." in change[0] else "", 9)
    )
    for key, _, value in ordered:
        if not key.startswith("run.") or key in NOT_COMPUTED or secret_setting(key, value):
            continue  # where it runs (engine, resources), the spec's prose and checks are not what it computes
        part = slug(describe(key, value))
        if part and len(part) + 1 <= room:
            parts.append(part)
            room -= len(part) + 1
    return "-".join([name, *parts, tail])
