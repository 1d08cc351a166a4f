"""The trainer's own error for a job it cannot train as specified."""


class CannotTrain(ValueError):
    """The job's spec, text or checkpoint does not allow training it; the message is for the job's owner.

    The runner ends such a job FAILED with the message as its reason. Any other
    exception from the trainer is a bug of ours, reported as an internal error.
    """
