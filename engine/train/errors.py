"""Why a training job stopped on its own: each is reported by the launchers as one line and a non-zero exit."""


class TrainingStopped(RuntimeError):
    """A job that cannot go on without losing or corrupting work (checkpoints, non-finite values)."""
