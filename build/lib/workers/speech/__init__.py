"""Speaking a turn through the Spatius Server SDK: PCM rules, endpoints, sessions and their pool,
leases, the turn and its frames pipe, resume after another attempt, control (interrupts), and the
in-process ``Producer``. Nothing here knows the job queue."""
