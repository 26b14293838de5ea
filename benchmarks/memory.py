"""Process memory: peak resident set size (Linux /proc), free memory, a child's peak RSS."""

import os
import resource
import subprocess
import threading
from typing import List, Optional, Tuple


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM (Linux >= 4.0: write 5 to clear_refs); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_kib(path: str, field: str) -> Optional[int]:
    """A 'Field:   N kB' line of a /proc file, in bytes (None when unreadable)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss() -> int:
    """Peak resident set size in bytes since start (or since `reset_peak_rss`)."""
    rss = _proc_kib("/proc/self/status", "VmHWM")
    return rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_bytes() -> int:
    """MemAvailable (what can be allocated without swapping), or total physical memory."""
    available = _proc_kib("/proc/meminfo", "MemAvailable")
    return available if available is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def run_measured(cmd: List[str], timeout: Optional[float] = None, **kwargs) -> Tuple[int, str, str, int]:
    """Run a command; (return code, stdout, stderr, the child's own peak RSS in bytes)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    output = {}

    def read(name, stream):
        output[name] = stream.read()

    readers = [threading.Thread(target=read, args=(n, s)) for n, s in (("out", proc.stdout), ("err", proc.stderr))]
    for r in readers:
        r.start()
    timer = threading.Timer(timeout, proc.kill) if timeout else None
    if timer:
        timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)  # wait4, not wait: it reports this child's rusage
    finally:
        if timer:
            timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    for r in readers:
        r.join()
    return proc.returncode, output.get("out", ""), output.get("err", ""), usage.ru_maxrss * 1024
