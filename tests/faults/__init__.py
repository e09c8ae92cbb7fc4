"""The fault suite: the whole relay on loopback, every role its own process, while ~30
conversations speak, with a fault injected mid-turn; an independent checker then compares every
client's record with the streams and the submitted clips (see ``checker``).

Layout: ``redis_proc`` (a Redis the suite may freeze, kill and restart), ``harness``
(``FaultStack``: Redis, simulator, producers, edges), ``clients`` (recording WebSocket clients of
their own, the socket dropper, slow clients), ``workload`` (turns submitted with retries),
``scenarios`` (the faults; its docstring says how to add one), ``run`` (runs scenarios, prints
the table). ``make faults`` runs every fault; ``tests/faults/test_faults.py`` runs ``SHORT`` in
``make test``.
"""
