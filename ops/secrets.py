"""What counts as a secret, for everything ops copies or publishes: the snapshot of a run's code
(diff.patch, RUN_DIR/code, the image), and the records people and services read (the registry,
job.json, provenance, EXPERIMENT_LOG.md, the journal, GitHub issues).

A file is a secret by its name (of the file, or of a folder above it; any case) or by its
content; a value given on the command line is one when its key names an environment variable
(`resources.*.env.*`) or when it looks like a credential. .dockerignore carries SECRET_NAMES
(dockerignore_lines; a test holds the two together).
"""

import fnmatch
import re
from pathlib import Path

# Names that hold credentials whatever their content: environment files, keys, cloud and package
# registry logins, and folders of them. Code may be called credentials_test.py or secret_sharing.py,
# so the broad words count only for data and config files.
SECRET_NAMES = (
    ".env",
    ".env.*",
    "*.env",
    ".envrc",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "*.jks",
    "*.keystore",
    "*.ovpn",
    "id_rsa*",
    "id_dsa*",
    "id_ecdsa*",
    "id_ed25519*",
    "credentials",
    "*.credentials",
    *(
        f"*{word}*.{suffix}"
        for word in ("credential", "secret", "service-account", "service_account", "token")
        for suffix in ("json", "yaml", "yml", "toml", "txt", "ini", "cfg", "conf")
    ),
    "kaggle.json",
    "adc.json",
    "application_default_credentials.json",
    ".netrc",
    "_netrc",
    "netrc*",
    ".git-credentials",
    ".pypirc",
    ".npmrc",
    ".dockercfg",
    ".htpasswd",
    ".ssh",
    ".aws",
    ".gnupg",
    ".kube",
    ".docker",
    ".gcloud",
    "secrets",
)
# Content that is a secret whatever the file is called: private keys, cloud credentials, tokens in
# their providers' formats. Case matters, and a token must not be the tail of a longer word
# (`task-conditioned_model` holds no OpenAI key).
SECRET_CONTENT = re.compile(
    rb"-----BEGIN [A-Z ]*PRIVATE KEY-----|\"private_key\"|\"type\"\s*:\s*\"(?:service_account|authorized_user)\""
    rb"|\"client_secret\"|\"refresh_token\"|aws_secret_access_key|\"auths\"\s*:|^\s*machine\s+\S+\s+login\s+\S+\s+password"
    rb"|(?<![A-Za-z0-9_-])(?:AKIA[0-9A-Z]{16}|AIza[0-9A-Za-z_-]{35}|gh[pousr]_[A-Za-z0-9]{30,}"
    rb"|github_pat_[A-Za-z0-9_]{30,}|glpat-[A-Za-z0-9_-]{20,}|xox[abposr]-[A-Za-z0-9-]{10,}"
    rb"|sk-(?:proj-)?[A-Za-z0-9_-]{20,}|[sr]k_live_[A-Za-z0-9]{16,}|hf_[A-Za-z0-9]{30,})"
    rb"|hooks\.slack\.com/services/",
    re.MULTILINE,
)
REDACTED = "***"


def secret_name(path: str) -> bool:
    return any(fnmatch.fnmatch(part.lower(), pattern) for part in Path(path).parts for pattern in SECRET_NAMES)


def secret_content(data: bytes) -> bool:
    return SECRET_CONTENT.search(data) is not None


def secret_setting(key: str, value) -> bool:
    """Whether `key=value` (a --set) carries a secret: an environment variable's value, or a
    value that looks like a credential."""
    parts = key.split(".")
    return (len(parts) >= 4 and parts[0] == "resources" and parts[2] == "env") or (
        isinstance(value, str) and secret_content(value.encode())
    )


def redact_assignment(text: str) -> str:
    """`KEY=VALUE` (or `--set=KEY=VALUE`) as it may be recorded: the value hidden when it is a secret."""
    option = next((prefix for prefix in ("--set=", "--sweep=") if text.startswith(prefix)), "")
    key, sep, value = text.removeprefix(option).partition("=")
    return f"{option}{key}={REDACTED}" if sep and secret_setting(key.strip(), value.strip()) else text


def redact_value(key: str, value):
    """A setting's value as it may be recorded (`key` a dotted path)."""
    return REDACTED if secret_setting(key, value) else value


def redact_words(words: list[str]) -> list[str]:
    """A command line (argv) as it may be recorded: each KEY=VALUE word redacted."""
    return [redact_assignment(word) for word in words]


def dockerignore_lines() -> list[str]:
    """SECRET_NAMES as .dockerignore lines, at any depth and in any case (Docker matches case)."""

    def any_case(pattern: str) -> str:
        return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in pattern)

    return [f"**/{any_case(pattern)}" for pattern in SECRET_NAMES]
