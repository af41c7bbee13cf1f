"""Measurements, not tests: run each as `python -m benchmarks.<name>` from the repo root."""


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; "?" elsewhere): step times depend on it."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line.split(":", 1)[1].strip() for line in info
                         if line.startswith("model name")), "?")
    except OSError:
        return "?"
