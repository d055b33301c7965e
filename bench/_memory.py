"""Peak memory of a benchmark worker, shared by the prunekit and llm-compressor workers (stdlib only)."""


def peak_rss_mb() -> float:
    """This process's own peak resident memory (VmHWM), not counting the parent it was forked from."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")
