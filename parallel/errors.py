"""The one error every part of the data plane raises when its work was abandoned."""


class Aborted(RuntimeError):
    """The operation was abandoned because the generation changed (or the run is ending)."""
