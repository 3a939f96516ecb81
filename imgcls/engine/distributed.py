"""Data-parallel training on PyTorch's own engine (torch.distributed + DDP).

One process per device. ``torchrun`` (or ``imgcls train --devices N``, which starts it)
sets RANK / WORLD_SIZE / LOCAL_RANK; :func:`setup` reads them, joins the process group
(NCCL on GPUs, Gloo on CPUs) and pins each process to ``cuda:LOCAL_RANK``.

Batches are split *inside* each global batch: global batch k is the same set of images
as in a single-process run with the same seed, and rank r takes its r-th block. With
equal per-rank batches DDP's averaged gradient is the single-process gradient, so the
same ``--batch-size`` (always the GLOBAL batch) and ``--lr`` reproduce a one-device run
(up to float reduction order and per-device BatchNorm statistics).

Only rank 0 writes the run folder and prints progress; metrics are summed across ranks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from imgcls.data.shards import shard_batch_order, shard_eval_order  # noqa: F401 (re-exported)
from imgcls.errors import ImgclsError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict:
        return {"world_size": self.world_size, "backend": self.backend or None}


SINGLE = DistContext()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def current() -> DistContext:
    """The context of an already initialised process group, else the single-process one."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = dist.get_backend()
    dev = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), local, dev, backend)


def setup(device_spec: str = "auto") -> DistContext:
    """Join the process group torchrun described in the environment (idempotent);
    the single-process context when not launched by torchrun."""
    if not launched_by_torchrun():
        return SINGLE
    if dist.is_initialized():
        return current()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = device_spec.startswith("cuda") or (device_spec == "auto" and torch.cuda.is_available())
    if want_cuda:
        if not torch.cuda.is_available():
            raise ImgclsError("--device cuda was asked for but no CUDA GPU is available", "use --device cpu")
        if local >= torch.cuda.device_count():
            raise ImgclsError(f"process {local} has no GPU: this machine has {torch.cuda.device_count()}",
                              "use --nproc-per-node (or --devices) at most the number of GPUs")
        torch.cuda.set_device(local)  # before init: NCCL binds each process to its own GPU
        backend, device = "nccl", torch.device("cuda", local)
    elif device_spec in ("auto", "cpu"):
        backend, device = "gloo", torch.device("cpu")
    else:
        raise ImgclsError(f"--device {device_spec} cannot be used for multi-process training",
                          "use --device auto, cpu or cuda")
    try:
        dist.init_process_group(backend, timeout=timedelta(minutes=int(os.environ.get("IMGCLS_DIST_TIMEOUT_MIN", "30"))),
                                device_id=device if backend == "nccl" else None)
    except (RuntimeError, ValueError) as exc:
        raise ImgclsError(f"cannot join the {backend} process group: {exc}".splitlines()[0],
                          "check MASTER_ADDR / --rdzv-endpoint and that every node can reach it") from None
    return DistContext(dist.get_rank(), dist.get_world_size(), local, device, backend)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """DDP around ``model`` (already on ctx.device); the plain model when single-process."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [ctx.local_rank] if ctx.device is not None and ctx.device.type == "cuda" else None
    # DDP's default buffer sync keeps BatchNorm running statistics identical on all ranks
    return DDP(model, device_ids=ids, output_device=ids[0] if ids else None)


def sum_across(values: list[float | torch.Tensor], ctx: DistContext, device: torch.device) -> list[float]:
    """Sum numbers over all ranks in one collective (a no-op single-process)."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values])
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def any_across(flags: list[bool], ctx: DistContext, device: torch.device) -> list[bool]:
    """Per flag: true on any rank. Lets rank-local events (a signal, rank 0's clock)
    become a decision all ranks take at the same step, so no rank waits in a collective."""
    if not ctx.enabled:
        return flags
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def broadcast_object(obj, ctx: DistContext):
    """Rank 0's ``obj`` on every rank (small picklable values made by imgcls itself,
    e.g. the run folder path; never user data)."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_object(obj, ctx: DistContext) -> list:
    """Every rank's ``obj`` as a list on every rank."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def weights_digest(model: torch.nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_in_sync(model: torch.nn.Module, ctx: DistContext) -> str | None:
    """The sha256 of the weights, after checking every rank holds the same ones (DDP
    keeps them equal; a difference is a bug, reported as such rather than saved)."""
    if not ctx.enabled:
        return None
    digests = gather_object(weights_digest(model), ctx)
    if len(set(digests)) != 1:
        raise RuntimeError(f"internal error: the processes' weights diverged ({digests})")
    return digests[0]


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def local_batch_size(global_batch: int, ctx: DistContext) -> int:
    if global_batch % ctx.world_size:
        raise ImgclsError(f"--batch-size {global_batch} is the global batch and must divide evenly over "
                          f"{ctx.world_size} processes",
                          f"use a multiple of {ctx.world_size}, "
                          f"e.g. {ctx.world_size * max(1, global_batch // ctx.world_size)}")
    return global_batch // ctx.world_size


# ---------------------------------------------------------------------- launcher
# launch() owns SIGINT / SIGTERM: torchrun's agent, left to them, raises SignalException (twice
# for a signal sent to the whole process group), prints tracebacks and exits 1; and a worker that
# fails makes it print a ~40-line ChildFailedError report. So the agent starts with both signals
# ignored (inherited SIG_IGN; --signals-to-handle keeps it from taking them back),
# the workers register in LAUNCH_DIR and get each signal from the launcher, once; a worker ends
# by writing its outcome there (exit code + the one line to print) and exiting 0, so the agent
# has nothing to report, and the launcher prints one line and exits with the code.
LAUNCH_DIR = "IMGCLS_LAUNCH_DIR"
OUTCOME_GRACE_S = 10.0  # after the first outcome, how long the other processes have to report theirs


class Stopped(KeyboardInterrupt):
    """SIGTERM in a launched worker outside training (where the checkpoint callback takes it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum, frame) -> None:
    raise Stopped(signum)


_LAUNCHED: Path | None = None  # a launched worker's LAUNCH_DIR (set by _join_launcher)


def launched_worker() -> bool:
    """This process is one of those :func:`launch` started (through torchrun)."""
    return _LAUNCHED is not None


def _write_file(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # the launcher never reads half a file


def _join_launcher() -> None:
    """In a launched worker (at import: train and predict both import this module first thing):
    take SIGINT / SIGTERM back from the SIG_IGN inherited through the agent, then register
    the pid, from which on the launcher forwards them."""
    global _LAUNCHED
    import multiprocessing

    if "RANK" not in os.environ or multiprocessing.parent_process() is not None \
            or threading.current_thread() is not threading.main_thread():
        return
    where = os.environ.pop(LAUNCH_DIR, None)  # not for the processes this one starts (data loaders)
    if not where:
        return
    _LAUNCHED = Path(where)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        _write_file(_LAUNCHED / f"pid.{int(os.environ['RANK'])}", str(os.getpid()))
    except (OSError, ValueError):
        pass  # the launcher is gone (its folder with it): nothing to forward to


def report_outcome(code: int, line: str | None) -> bool:
    """A launched worker's result for the launcher to print (one line, once) and exit with;
    False (nothing written) in any other process."""
    if not launched_worker():
        return False
    try:
        _write_file(_LAUNCHED / f"outcome.{int(os.environ['RANK'])}.json",
                    json.dumps({"code": int(code), "line": line}))
    except (OSError, ValueError):
        return False
    return True


class _Launcher:
    """The waiting side of :func:`launch`: forwards signals, collects the workers' outcomes."""

    def __init__(self, nproc: int, where: Path):
        self.nproc, self.where = nproc, where
        self.signals: list[int] = []  # received, in order
        self.sent: dict[int, int] = {}  # rank -> how many of them it has been sent
        self.first_outcome: float | None = None
        self.killed = False

    def _read(self, prefix: str) -> dict[int, str]:
        out = {}
        for f in self.where.glob(f"{prefix}.*"):
            rank = f.name[len(prefix) + 1:].split(".")[0]
            if rank.isdigit():
                try:
                    out[int(rank)] = f.read_text()
                except OSError:
                    pass
        return out

    def workers(self) -> dict[int, int]:
        return {r: int(t) for r, t in self._read("pid").items() if t.strip().isdigit()}

    def outcomes(self) -> dict[int, dict]:
        out = {}
        for r, text in self._read("outcome").items():
            try:
                out[r] = json.loads(text)
            except ValueError:
                pass
        return out

    def on_signal(self, signum, frame) -> None:
        self.signals.append(signum)
        self.forward()

    def forward(self) -> None:
        """Each signal received, once to each registered worker (and to its process group,
        its data-loading processes, as torchrun does); a worker that registers later gets
        those it missed while it ignored them."""
        for rank, pid in self.workers().items():
            for sig in self.signals[self.sent.get(rank, 0):]:
                try:
                    os.killpg(pid, sig)  # torchrun starts each worker in a session of its own
                except (ProcessLookupError, PermissionError):
                    try:
                        os.kill(pid, sig)
                    except (ProcessLookupError, PermissionError):
                        pass
            self.sent[rank] = len(self.signals)

    def tick(self, proc) -> None:
        self.forward()
        outcomes = self.outcomes()
        if outcomes and self.first_outcome is None:
            self.first_outcome = time.monotonic()
        if self.killed or self.first_outcome is None or len(outcomes) >= self.nproc \
                or time.monotonic() - self.first_outcome < OUTCOME_GRACE_S:
            return
        # a process that did not report is waiting for one that left (in a collective): the agent
        # goes first, so that no failure report follows, then the stragglers
        self.killed = True
        for pid in [proc.pid] + [p for r, p in self.workers().items() if r not in outcomes]:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def finish(self, rc: int) -> int:
        outcomes = self.outcomes()
        if not outcomes:
            return 128 + self.signals[0] if self.signals and rc else rc
        # rank 0's, unless only another rank has the cause (an internal error elsewhere is a consequence)
        rank = min(outcomes, key=lambda r: (outcomes[r].get("code") == 3, not outcomes[r].get("line"), r))
        if outcomes[rank].get("line"):
            print(outcomes[rank]["line"], file=sys.stderr, flush=True)
        return int(outcomes[rank].get("code", 1))


def launch(nproc: int, train_args: list[str], command: str = "train") -> int:
    """``imgcls train --devices N`` (or ``imgcls predict --devices N``: ``command``): start N
    processes on this machine through PyTorch's own launcher (torch.distributed.run =
    torchrun) and wait for them. Multi-node runs call torchrun directly (docs/distributed.md).
    SIGTERM / Ctrl-C reach the workers once, from here; a worker's one-line outcome is
    printed once and is the exit code (see LAUNCH_DIR above)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "imgcls", command, *train_args]
    env = dict(os.environ)
    if not (torch.cuda.is_available() and torch.cuda.device_count() >= nproc):
        # CPU processes share the cores: split them instead of oversubscribing
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # on SIGHUP (which the agent still handles) torchrun waits this long before SIGKILL
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "120")
    env.setdefault("LOGLEVEL", "ERROR")  # torchrun's own warnings (its OMP_NUM_THREADS notice, ...)
    if threading.current_thread() is not threading.main_thread():  # signal handlers only go there
        return subprocess.Popen(cmd, env=env).wait()
    with tempfile.TemporaryDirectory(prefix="imgcls-launch-") as where:
        env[LAUNCH_DIR] = where
        # torchrun's --signals-to-handle (PET_: its flags' environment form; older torch reads the other)
        env["PET_SIGNALS_TO_HANDLE"] = env["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGHUP,SIGQUIT"
        launcher = _Launcher(nproc, Path(where))
        handled = (signal.SIGINT, signal.SIGTERM)
        old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in handled}  # what the agent inherits
        try:
            proc = subprocess.Popen(cmd, env=env)
            for sig in handled:
                signal.signal(sig, launcher.on_signal)
            done, box = threading.Event(), {}

            def wait() -> None:
                box["rc"] = proc.wait()
                done.set()

            threading.Thread(target=wait, daemon=True).start()
            while not done.wait(0.1):  # (signal handlers run here, in the main thread)
                launcher.tick(proc)
            return launcher.finish(box["rc"])
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)


_join_launcher()
