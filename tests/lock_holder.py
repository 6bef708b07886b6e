"""What tests/test_run_record.py runs as the other process: it takes a run folder's lock with the library's own
function, as a running slimrarts process does, says so on stdout, and holds it until its stdin closes or it is
killed.

    python tests/lock_holder.py <run folder>
"""

from __future__ import annotations

import sys

from slimrarts.engine.runlock import lock_run_dir

if __name__ == "__main__":
    lock = lock_run_dir(sys.argv[1])
    lock.note_holder()
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes the pipe (or kills this process)
    lock.release()
