"""``relay bench``: bounded, self-stopping load runs on this machine, over loopback only.

Two paths are measured against a bare-loop baseline run at the same conversation count:

* **edge path**: a light writer process appends standard conversations straight to conversation
  streams; one ``relay edge`` process delivers them to real WebSocket clients in several client
  processes.
* **full path**: a feeder process speaks streamed turns through the job queue; ``relay producer``
  runs them through the unmodified SDK against ``relay motion-sim``; one edge delivers them.

Every role is its own OS process. Latency is the stream entry id's millisecond part (the
server's append time, 1 ms resolution) to the client's receive time on the same clock.
See docs/benchmarks.md for the method and the recorded runs.
"""
