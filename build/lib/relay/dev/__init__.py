"""Development tooling: embedded Valkey, the local stack, the demo, the Motion Server simulator
and the benchmarks. The product (core, edge, client, workers) never imports this package; the CLI
loads it only for the dev commands (`relay run`, `relay demo`, `relay motion-sim`, `relay bench`).
"""
