"""A worker process for crash tests: `python -m tests.worker_proc DSN` follows the slot until killed."""

import sys

from slipstream.worker.runner import StreamRunner

from .worker_harness import Harness

if __name__ == "__main__":
    harness = Harness(sys.argv[1])
    runner = StreamRunner(harness.settings, harness.applier, tables=set(harness.mappers))
    runner.install_signal_handlers()
    runner.run()
