"""The coordinator's environment: one settings object, read once (pydantic-settings).

``fedtune coordinator serve`` takes its own settings from ``coordinator.toml`` and its flags
(:class:`fedtune.coordinator.cli.ServeConfig`); the processes it starts can be told nothing but their
environment: the SuperLink, and through it Flower's ``flwr-serverapp``, which runs the round engine.
So ``serve`` builds a :class:`CoordinatorSettings` and writes it out (:meth:`CoordinatorSettings.to_env`),
and the ServerApp, the store's migrations and the ``fedtune audit`` commands read it back with
``CoordinatorSettings()``. A variable's name is its field's, upper-cased, after ``FEDTUNE_``
(:meth:`CoordinatorSettings.env_name`); no other code spells one out (tests/test_settings.py checks).

========================================  ==============================================================
``FEDTUNE_DATABASE_URL``                  the store: a SQLite or PostgreSQL SQLAlchemy URL
``FEDTUNE_BLOB_DIR``                      where the encrypted adapter blobs live
``FEDTUNE_BLOB_KEY`` / ``_BLOB_KEY_FILE``   the blob key, base64, or a file holding it (``encryption.py``)
``FEDTUNE_COORDINATOR_KEY_FILE``          the Ed25519 key that signs audit checkpoints (compliance's name)
``FEDTUNE_JOB_ID``                        the ServerApp's job when its run config names none
``FEDTUNE_ROUND_METRICS_FILE``            the ServerApp appends each round's metrics here (benchmarks)
========================================  ==============================================================

There are no default secrets: without a blob key the ServerApp refuses to start (``encryption.py``).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from fedtune.compliance.checkpoints import COORDINATOR_KEY_ENV

ENV_PREFIX = "FEDTUNE_"


class CoordinatorSettings(BaseSettings):
    """What the coordinator's processes read from the environment (the table above)."""

    # an empty variable counts as unset (it would be the path "." otherwise)
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore", populate_by_name=True,
                                      env_ignore_empty=True)

    database_url: str | None = None
    blob_dir: Path | None = None
    blob_key: SecretStr | None = None
    blob_key_file: Path | None = None
    # compliance reads this one itself (fedtune audit keygen / checkpoints): its name is compliance's
    coordinator_key_file: Path | None = Field(default=None, validation_alias=COORDINATOR_KEY_ENV)
    job_id: str = ""
    round_metrics_file: Path | None = None

    @classmethod
    def env_name(cls, field: str) -> str:
        """The environment variable of ``field`` (``database_url`` -> ``FEDTUNE_DATABASE_URL``).

        Raises:
            KeyError: no such setting.
        """
        info = cls.model_fields[field]
        return info.validation_alias if isinstance(info.validation_alias, str) else ENV_PREFIX + field.upper()

    def to_env(self) -> dict[str, str]:
        """The settings that are set, as environment variables for a child process (secrets in clear: a child's
        environment is the only way to hand them over; it is readable by the same user only)."""
        out = {}
        for field in type(self).model_fields:
            value = getattr(self, field)
            if value is None or value == "":
                continue
            out[self.env_name(field)] = value.get_secret_value() if isinstance(value, SecretStr) else str(value)
        return out

    def require(self, *fields: str, who: str) -> None:
        """Raises ValueError naming the variables of ``fields`` that are not set, and ``who`` needs them."""
        missing = [self.env_name(f) for f in fields if getattr(self, f) in (None, "")]
        if missing:
            raise ValueError(f"{who} needs {' and '.join(missing)} in its environment")
