"""``itop-train`` under ``accelerate launch`` with a different setting on rank 1 (tests only).

ITOP_TEST_RANK1_ARGS: extra flags for rank 1 (a user who edited one node's command);
ITOP_TEST_RANK1_SLEEP: seconds rank 1 stalls before the trainer's first collective of its own
(a rank that stops answering), once the process group is up.
"""

import os
import sys
import time

from launcher.train import main

extra = []
if os.environ.get("RANK") == "1":
    extra = os.environ.get("ITOP_TEST_RANK1_ARGS", "").split()
    stall = float(os.environ.get("ITOP_TEST_RANK1_SLEEP", "0"))
    if stall:
        from itop_dist import collectives

        real = collectives.differing_settings

        def stalled(*args, **kwargs):
            time.sleep(stall)
            return real(*args, **kwargs)

        collectives.differing_settings = stalled
sys.exit(main(sys.argv[1:] + extra))
