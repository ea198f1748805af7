"""The one kind of failure a command reports as a sentence, not a traceback: bad data, a failed gate or
promotion, an unusable remote. Each domain raises its own subclass; the CLI catches this base alone, so
naming them costs no import of the domains."""


class Failure(RuntimeError):
    """Something tollgate refuses to do or could not do; the message names the cause and what to do."""
