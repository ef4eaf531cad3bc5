"""The one error the evaluation raises on purpose when a metric cannot be computed as asked."""


class MissingWeightsError(RuntimeError):
    """A metric's network weights are neither a local file nor downloadable; the message names the file to supply."""
