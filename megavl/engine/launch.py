"""Who am I in the job: rank and world size from torch, DeepSpeed or Slurm, then process-group init;
and, on the way out, the teardown and the exit code the whole job agrees on.

Launchers set different variables: `deepspeed`/`torchrun` set RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; `srun` sets SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID; `mpirun`
(`deepspeed --launcher openmpi`) sets OMPI_COMM_WORLD_RANK, _SIZE and _LOCAL_RANK only. A plain
`python megavl/train.py` sets none and runs as a world of one.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch

log = logging.getLogger("megavl")
# How long a rank on its way out waits for the others (leave_job). Ranks that stop for the same
# reason arrive within seconds of each other: every collective before the exit lines them up.
EXIT_WAIT_S = 60.0
_EXIT_KEY = "megavl/exit/rank"


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def fill_env_from_launcher(env: dict[str, str] | None = None) -> dict[str, str]:
    """Make RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT present, from mpirun, Slurm or as a world of one.

    Variables already set win: a launcher that sets them is never second-guessed.
    """
    env = os.environ if env is None else env
    if "RANK" not in env and "OMPI_COMM_WORLD_RANK" in env:
        env["RANK"] = env["OMPI_COMM_WORLD_RANK"]
        env["WORLD_SIZE"] = env.get("OMPI_COMM_WORLD_SIZE", "1")
        env["LOCAL_RANK"] = env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")
        env.setdefault("LOCAL_WORLD_SIZE", env.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1"))
        # mpirun passes no rendezvous address, and the default 127.0.0.1 is another machine on every
        # other node.
        if env["WORLD_SIZE"] != "1" and "MASTER_ADDR" not in env:
            raise RuntimeError("started by mpirun without MASTER_ADDR: put MASTER_ADDR=<first host> and "
                               "MASTER_PORT=<free port> in .deepspeed_env (docs/multinode.md)")
    if "RANK" not in env and "SLURM_PROCID" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env.get("SLURM_NTASKS", "1")
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", _first_slurm_host())
        # One port per job so two jobs sharing a node do not collide.
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    env.setdefault("RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        if env["WORLD_SIZE"] != "1":
            raise RuntimeError("MASTER_PORT is not set for a multi-process job; the launcher must set it")
        env["MASTER_PORT"] = str(_free_port())
    return env


RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child training run, plus `extra`, without the rendezvous
    variables: an in-process world of one leaves them in os.environ (`fill_env_from_launcher`), and
    a child that inherited them would try to listen on this process's MASTER_PORT."""
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}
    return {**env, **extra}


def _skip_shm_op_build() -> None:
    """DeepSpeed JIT-compiles a CPU shared-memory all-reduce op at every CPU init (a minute or more,
    and again whenever another environment shares ~/.cache/torch_extensions). gloo does not use it."""
    from .ds_compat import require_shm_op_hook

    require_shm_op_hook().build_shm_op = lambda: None


def init_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed: NCCL on GPUs, gloo on CPU."""
    import deepspeed

    fill_env_from_launcher()
    rank, world, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if backend == "gloo":
        _skip_shm_op_build()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def close_distributed() -> None:
    """Leave the job cleanly: wait for every rank, then destroy the process group. Left to interpreter
    exit, gloo's threads can be torn down while a peer still talks to them: a finished run's rank
    then aborts ("terminate called without an active exception") and the job reads as failed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def leave_job(code: int, message: str | None = None, wait_s: float = EXIT_WAIT_S) -> int:
    """Every rank's last act in train.py: agree on the job's exit code, print the reason once, and
    tear down the process group. Returns the code this rank must exit with.

    `code`/`message` are this rank's outcome: (0, None) finished or stopped after its checkpoint, or
    a refusal (its documented code and one-line message). Left to interpreter exit instead, gloo's
    threads can be torn down while a peer still talks to them; the rank then aborts ("terminate
    called without an active exception") and the launcher reports 250 instead of the code.

    The ranks meet in the process group's key-value store, not in a collective: a rank that failed
    alone (a file one node cannot read) must not wait forever in a barrier that a peer, blocked in
    another collective, never reaches. When every rank posts its outcome within `wait_s` seconds,
    the job's code is the lowest failing rank's (every rank exits with it, so what the launcher
    reports does not depend on which rank it sees end first) and its message is printed by that rank
    alone (another rank's different message as well). Otherwise this rank withdraws its outcome,
    prints its own message and exits with its own code; its peers then fail in their collective.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        _say(message)
        return code
    rank, world = dist.get_rank(), dist.get_world_size()
    outcomes = _meet(rank, world, code, message, wait_s) if world > 1 else [(code, message)]
    if outcomes is None:
        log.warning("rank %d: not every rank reached the exit within %.0f s; leaving without them", rank, wait_s)
        _say(message)
        dist.destroy_process_group()
        return code
    failed = [r for r, (c, _) in enumerate(outcomes) if c != 0]
    earlier = {m for c, m in outcomes[:rank] if c != 0}
    if code != 0 and message not in earlier:
        _say(message)
    dist.destroy_process_group()
    return outcomes[failed[0]][0] if failed else 0


def _meet(rank: int, world: int, code: int, message: str | None, wait_s: float) -> list | None:
    """Every rank's (code, message) once all have posted theirs, or None after wait_s seconds.

    Rank 0 hosts the store: it leaves only after every rank has read the outcomes."""
    from torch.distributed import distributed_c10d

    store = distributed_c10d._get_default_store()
    mine = f"{_EXIT_KEY}{rank}"
    try:
        store.set(mine, json.dumps([code, message]))
        store.wait([f"{_EXIT_KEY}{r}" for r in range(world)], timedelta(seconds=wait_s))
        outcomes = [tuple(json.loads(store.get(f"{_EXIT_KEY}{r}"))) for r in range(world)]
        store.set(f"{_EXIT_KEY}{rank}/read", "1")
    except Exception:  # noqa: BLE001 - a timeout, or the store's host already gone
        try:
            store.delete_key(mine)  # a late peer must not count on this rank any more
        except Exception:  # noqa: BLE001 - nothing to withdraw from a store that is gone
            pass
        return None
    if rank == 0:
        try:
            store.wait([f"{_EXIT_KEY}{r}/read" for r in range(world)], timedelta(seconds=wait_s))
        except Exception:  # noqa: BLE001 - a peer died after posting: its outcome is already known
            log.warning("not every rank confirmed the exit within %.0f s", wait_s)
    return outcomes


def _say(message: str | None) -> None:
    if message:
        print(message, file=sys.stderr, flush=True)
