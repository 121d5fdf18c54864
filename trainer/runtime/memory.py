"""This process's resident memory from /proc (Linux): what the benchmarks and the dry run measure."""


def memory_kib() -> dict[str, int]:
    """Current (VmRSS) and peak (VmHWM) resident memory of this process, kiB.

    Not ru_maxrss: Linux carries the parent's high-water mark over fork+exec into the child's.
    """
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return {name: int(fields[name].split()[0]) for name in ("VmRSS", "VmHWM")}


def measured_from_here() -> int:
    """Counts peak resident memory (VmHWM) from now on (what came before is not the work's); returns the
    resident memory now, kiB."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return memory_kib()["VmRSS"]
