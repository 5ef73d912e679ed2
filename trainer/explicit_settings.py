"""TrainSettings from explicit values only, for the trainings that are not `gramrec train`.

`gramrec train` fills TrainSettings from its flags and `GRAMREC_*` variables. A retrain job, a first start and
`gramrec evaluate` rebuild settings from a checkpoint or from their own settings object instead; they must
never pick up a training variable from the environment (`GRAMREC_MAX_STEPS_PER_EPOCH` would silently cut
every retrain short).
"""

from __future__ import annotations

from typing import Any

from gramrec.trainer.settings import TrainSettings


class _ExplicitTrainSettings(TrainSettings):
    """TrainSettings whose only source is the values given: no environment variables, no dotenv, no secrets."""

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        return (init_settings,)


def explicit_train_settings(**values: Any) -> TrainSettings:
    """TrainSettings from these values and the defaults only, whatever `GRAMREC_*` variables are set."""
    return _ExplicitTrainSettings(**values)
