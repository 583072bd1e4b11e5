"""Memory: GGUF headers, estimates and calibration, probes (RAM, cgroup, NVML, the budget), the ledger,
and the scheduler (which servers run together, with how many slots, and which stop)."""
