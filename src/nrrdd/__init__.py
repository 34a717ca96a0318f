"""nrrdd: dataset distillation with NRR-DD, RDED and SRe2L as presets of one harness."""

__version__ = "0.1.0"


class NrrddError(Exception):
    """A user-facing error: what is wrong, where, and how to fix it. The CLI prints it without a traceback."""
