"""The Redis tier (L2) and what talks to Redis beside it: client set-up, pipelined reads, leases,
cross-replica coherence."""
