"""Peak memory of a benchmark worker, shared by the prunekit and llm-compressor workers (stdlib only)."""


def peak_rss_mb() -> float:
    """This process's own peak resident memory (VmHWM), not counting the parent it was forked from."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_mb() -> float:
    """This process's resident memory now (VmRSS)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def reset_peak() -> None:
    """Restart the VmHWM high-water mark from the current RSS (Linux: /proc/self/clear_refs, value 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
