"""One rank of a 2-rank gloo world leaving through megavl.engine.launch.leave_job, as train.py does,
in the scenario named by argv[1] (tests/distributed/test_engine_leave_job.py says what each shows).
Prints `rank R exit C` and exits with leave_job's code."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megavl.engine.launch import init_distributed, leave_job  # noqa: E402

REFUSAL = "megavl: cannot start: rank 1 cannot read its checkpoint"
WAIT_S = 3.0


def main(scenario: str) -> int:
    rank = init_distributed().rank
    if scenario == "one_refuses":  # rank 0 finished, rank 1 refused after the last collective
        outcome = (3, REFUSAL) if rank == 1 else (0, None)
    elif scenario == "both_refuse":  # the usual refusal: rank 0's decision, raised on every rank
        outcome = (2, "megavl: bad configuration: data.batch_size: expected > 0, got 0")
    elif scenario == "peer_blocked":  # rank 1 refuses while rank 0 waits in a collective it never joins
        if rank == 1:
            outcome = (3, REFUSAL)
        else:
            try:
                dist.all_reduce(torch.ones(1))
                outcome = (0, None)
            except Exception as err:  # noqa: BLE001 - the peer left: a failed collective, as in train.py
                print(f"rank 0 collective failed: {type(err).__name__}", flush=True)
                outcome = (1, None)
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    code = leave_job(*outcome, wait_s=WAIT_S)
    print(f"rank {rank} exit {code}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
