#!/usr/bin/env python
"""Runs one jaxpar command as N processes on this host, joined over loopback.

  python scripts/launch_local.py --processes 2 -- forward --config configs/tiny.yaml --devices 4

Each rank is a `scripts/run.py` process given `--coordinator 127.0.0.1:PORT --num-processes N
--process-id I` (a free port, unless --port says one). Rank 0's output is shown as it comes;
the others' is kept in temporary files and shown when they fail. When a rank fails, the others
are stopped (SIGTERM, then SIGKILL after --grace seconds) and the launcher exits non-zero
naming it; no rank is left behind, even if the launcher itself is killed (Linux). Each rank runs
in its own process group, so nothing it starts survives it either. (A rank that has joined the
cluster takes SIGTERM as JAX's preemption notice and keeps running: SIGKILL ends it.)
"""

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

RUN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run.py")
_CLUSTER_FLAGS = ("--coordinator", "--num-processes", "--process-id")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              usage="%(prog)s --processes N [options] -- COMMAND [run.py options]")
  p.add_argument("--processes", type=int, required=True, metavar="N", help="ranks to start")
  p.add_argument("--host", default="127.0.0.1",
                 help="the coordinator's address (default 127.0.0.1: loopback only)")
  p.add_argument("--port", type=int, default=0, help="the coordinator's port (default: a free one)")
  p.add_argument("--grace", type=float, default=3.0, metavar="SECONDS",
                 help="after a failure, how long the other ranks get to end on SIGTERM before "
                      "SIGKILL (default 3)")
  p.add_argument("--timeout", type=float, default=0.0, metavar="SECONDS",
                 help="stop every rank after this long (default 0: no limit)")
  p.add_argument("run_args", nargs=argparse.REMAINDER, help="-- then scripts/run.py's arguments")
  return p


def free_port(host: str) -> int:
  with socket.socket() as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def _die_with_parent() -> None:
  """In the child, before exec: SIGKILL when the launcher dies (Linux prctl PR_SET_PDEATHSIG;
  a joined JAX process takes SIGTERM as a preemption notice and keeps running)."""
  try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
  except (OSError, AttributeError):  # not Linux: --grace and the process groups still apply
    pass


def start(n: int, address: str, run_args: list[str], log_dir: str) -> list[subprocess.Popen]:
  """Starts ranks 0..n-1; rank 0 writes to this terminal, rank i to log_dir/rank{i}.log."""
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  procs = []
  for rank in range(n):
    cmd = [sys.executable, RUN, *run_args, "--coordinator", address,
           "--num-processes", str(n), "--process-id", str(rank)]
    out = None if rank == 0 else open(os.path.join(log_dir, f"rank{rank}.log"), "wb")
    procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out
                                  else None, start_new_session=True,
                                  preexec_fn=_die_with_parent if sys.platform == "linux" else None))
    if out is not None:
      out.close()  # the child holds its own copy
  return procs


def stop(procs: list[subprocess.Popen], grace: float) -> None:
  """SIGTERM to every rank still running (its whole process group), SIGKILL to those left
  after `grace` seconds; reaps them all."""
  for sig in (signal.SIGTERM, signal.SIGKILL):
    for p in procs:
      if p.poll() is None:
        try:
          os.killpg(p.pid, sig)
        except ProcessLookupError:
          pass
    deadline = time.monotonic() + grace
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
      time.sleep(0.05)
  for p in procs:
    p.wait()


def how(code: int) -> str:
  """'exited with status 2' / 'was killed by SIGKILL'."""
  if code < 0:
    return f"was killed by {signal.Signals(-code).name}"
  return f"exited with status {code}"


def watch(procs: list[subprocess.Popen], timeout: float) -> int | None:
  """Waits until every rank has ended well (None) or one has failed (its rank), or `timeout`
  passed (-1)."""
  deadline = time.monotonic() + timeout if timeout > 0 else None
  while True:
    codes = [p.poll() for p in procs]
    failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
    if failed:
      return failed[0]
    if all(code == 0 for code in codes):
      return None
    if deadline is not None and time.monotonic() > deadline:
      return -1
    time.sleep(0.05)


def _tail(path: str, lines: int = 40) -> str:
  with open(path, errors="replace") as f:
    return "".join(f.readlines()[-lines:])


def _say(text: str) -> None:
  print(f"launch_local: {text}", file=sys.stderr, flush=True)


def _report(procs: list[subprocess.Popen], rank: int, log_dir: str) -> None:
  """Names the rank that failed first (and any others), and shows its output unless rank 0
  failed too (whose output is already on screen)."""
  failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0) and r != rank]
  running = sum(p.poll() is None for p in procs)
  also = ""
  if failed:
    also = f"; rank{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))} failed too"
  stopping = f"; stopping the {running} still running" if running else ""
  _say(f"error: rank {rank} (pid {procs[rank].pid}) {how(procs[rank].returncode)}{also}"
       f"{stopping}")
  if rank != 0 and 0 not in failed:
    log = _tail(os.path.join(log_dir, f"rank{rank}.log"))
    _say(f"rank {rank}'s output (last 40 lines):\n{log}")


def _terminate(signum, frame):
  raise SystemExit(128 + signum)  # unwinds into `finally`, which stops the ranks


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  run_args = args.run_args[1:] if args.run_args[:1] == ["--"] else args.run_args
  if args.processes < 1:
    _say(f"error: --processes {args.processes}: must be at least 1")
    return 2
  if not run_args or any(a.split("=")[0] in _CLUSTER_FLAGS for a in run_args):
    _say("error: give scripts/run.py's arguments after --, e.g. -- forward --config "
         "configs/tiny.yaml, without --coordinator, --num-processes or --process-id (the "
         "launcher sets them)")
    return 2
  address = f"{args.host}:{args.port or free_port(args.host)}"
  signal.signal(signal.SIGTERM, _terminate)
  procs: list[subprocess.Popen] = []
  with tempfile.TemporaryDirectory(prefix="jaxpar-ranks-") as log_dir:
    try:
      procs = start(args.processes, address, run_args, log_dir)
      _say(f"{args.processes} ranks on {address}, pids {' '.join(str(p.pid) for p in procs)}; "
           f"rank 0's output follows")
      rank = watch(procs, args.timeout)
      if rank is None:
        return 0
      if rank < 0:
        _say(f"error: the ranks ran past --timeout {args.timeout:g} s; stopping them")
        return 124
      time.sleep(min(1.0, args.grace))  # a mistake every rank makes ends them all by itself
      _report(procs, rank, log_dir)
      code = procs[rank].returncode
      return code if code > 0 else 128 - code
    except KeyboardInterrupt:  # Ctrl-C reaches only the launcher: ranks have their own sessions
      _say("interrupted; stopping every rank")
      return 130
    finally:
      stop(procs, args.grace)


if __name__ == "__main__":
  sys.exit(main())
