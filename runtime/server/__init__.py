"""The composition root: the Runtime that builds the actor tree (``app``), the process's
lifecycle of listen, drain and stop (``serve``), and the command line (``cli``)."""
