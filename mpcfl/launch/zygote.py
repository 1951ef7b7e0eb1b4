"""Warm starts: the local launcher's parties and dealer forked from one interpreter that has imported torch.

A cold ``python -m mpcfl party`` spends about 2 CPU-seconds importing torch, crypten and mpcfl
before it does anything: most of a small job's CPU on a 2-core machine, once per process. The
local launcher instead starts one *zygote* per run (``python -m mpcfl.launch.zygote``), which
imports torch, numpy and mpcfl's modules but not crypten, then forks each of the run's processes on request.
What the zygote holds is what every child loads anyway: it reads no job file, no data, no key
and no secret, and imports no crypten (its patches, generators and keys are made in each child, after
the fork). A child gets its command, environment and working folder in its request.

Right after the fork each child takes its own process group (the launcher stops it by group),
dies with the zygote (which dies with the launcher), writes to the launcher's pipe, takes the
environment and command line it would have had cold (its title shows the command, so ``ps`` and
``/proc`` find it as before; the run's secret comes through a pipe the zygote never reads),
reseeds numpy's and torch's global generators from the OS (Python's ``random`` reseeds itself on
fork), and runs ``python -m mpcfl``'s code. The children share what a fork shares: the address
layout and ``str`` hash seed of the zygote. The zygote reaps the children and
reports each exit status; :class:`ForkedProcess` gives the launcher the part of
``subprocess.Popen`` it uses. ``MPCFL_COLD_START=1`` starts every process cold instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import IO

ENV_COLD_START = "MPCFL_COLD_START"
_MESSAGE_BYTES = 1 << 20  # one request: a command and an environment
_POLL_S = 0.02
_START_TIMEOUT_S = 120.0  # the zygote's own imports come first
_PRELOAD = ("numpy", "torch", "mpcfl.cli", "mpcfl.tasks.run", "mpcfl.mpc.session")


def die_with_parent() -> None:
    """In a child: SIGKILL it when its parent dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


class ForkedProcess:
    """A process forked by the zygote: the part of ``subprocess.Popen``'s interface the launcher uses."""

    def __init__(self, pid: int, stdout: IO[bytes]) -> None:
        self.pid = pid
        self.stdout = stdout
        self.returncode: int | None = None
        self._ended = threading.Event()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def ended(self, code: int) -> None:
        self.returncode = code
        self._ended.set()


class Zygote:
    """The launcher's end: starts the zygote, asks it for children, and learns how each ended."""

    def __init__(self, env: dict[str, str]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._channel = ours
        self._process = subprocess.Popen(
            [sys.executable, "-u", "-m", "mpcfl.launch.zygote", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=die_with_parent,
        )
        theirs.close()
        self._lock = threading.Lock()  # one request in flight: its answer is the next "started"
        self._started: list[int] = []
        self._arrived = threading.Condition()
        self._children: dict[int, ForkedProcess] = {}
        self._exits: dict[int, int] = {}  # exits heard before their child was registered
        self._gone = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._process.pid

    def _read(self) -> None:
        while True:
            try:
                data = self._channel.recv(_MESSAGE_BYTES)
            except OSError:
                data = b""
            if not data:  # the zygote is gone, and its children with it (they die with it)
                with self._arrived:
                    for child in self._children.values():
                        if child.returncode is None:
                            child.ended(-signal.SIGKILL)
                    self._gone = True
                    self._arrived.notify_all()
                return
            message = json.loads(data)
            with self._arrived:
                if "started" in message:
                    self._started.append(message["started"])
                    self._arrived.notify_all()
                elif message["exit"] in self._children:
                    self._children[message["exit"]].ended(message["code"])
                else:
                    self._exits[message["exit"]] = message["code"]

    def spawn(self, command: list[str], env: dict[str, str], private: dict[str, str] | None = None) -> ForkedProcess:
        """Forks ``command`` (``python -m mpcfl ...``) with ``env``, its output on a new pipe. ``private``
        entries (the run's secret) join its environment through a pipe of their own that only the
        child reads: the zygote passes it on unread, so they never enter its memory."""
        read_end, write_end = os.pipe()
        secret_read, secret_write = os.pipe()
        os.write(secret_write, json.dumps(private or {}).encode())  # far below a pipe's buffer
        os.close(secret_write)
        request = json.dumps({"argv": command, "env": env, "cwd": os.getcwd()}).encode()
        try:
            with self._lock:
                try:
                    socket.send_fds(self._channel, [request], [write_end, secret_read])
                finally:
                    os.close(write_end)
                    os.close(secret_read)
                deadline = time.monotonic() + _START_TIMEOUT_S
                with self._arrived:
                    while not self._started and not self._gone:
                        if not self._arrived.wait(timeout=max(0.0, deadline - time.monotonic())):
                            break
                    if not self._started:
                        raise RuntimeError(f"the launcher's zygote (pid {self.pid}) did not start {' '.join(command[3:5])}")
                    pid = self._started.pop(0)
                    child = ForkedProcess(pid, os.fdopen(read_end, "rb"))
                    self._children[pid] = child
                    if pid in self._exits:
                        child.ended(self._exits.pop(pid))
        except BaseException:
            os.close(read_end)
            raise
        return child

    def close(self) -> None:
        """Lets the zygote go once its children are done (the launcher has stopped or waited for each)."""
        with contextlib.suppress(OSError):
            self._channel.shutdown(socket.SHUT_WR)
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
        self._reader.join(timeout=2)
        self._channel.close()


@contextlib.contextmanager
def warm_starts(env: dict[str, str]) -> Iterator[Zygote | None]:
    """A zygote for one run, started with ``env`` (no run's secret, no process's role), or None when
    ``MPCFL_COLD_START=1`` asks for cold starts."""
    if os.environ.get(ENV_COLD_START) == "1":
        yield None
        return
    zygote = Zygote(env)
    try:
        yield zygote
    finally:
        zygote.close()


def _become(data: bytes, fds: list[int], channel: socket.socket, zygote: int) -> None:
    """In a fresh fork: turn into the process the request ``data`` describes (``fds``: its output pipe and
    the pipe of its private environment entries), run it, and exit with its status."""
    code = 1
    try:
        channel.close()
        os.setpgid(0, 0)  # its own process group, as the zygote also sets: killpg(pid) stops it alone
        die_with_parent()
        if os.getppid() != zygote:  # the zygote died before the line above: do not outlive it
            os._exit(1)
        for number in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(number, signal.SIG_DFL)
        output, secret = fds
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(output, 1)
        os.dup2(output, 2)
        os.close(null)
        os.close(output)
        with os.fdopen(secret, "rb") as pipe:
            private = json.loads(pipe.read())
        request = json.loads(data)
        argv = request["argv"]
        if argv[1:3] != ["-m", "mpcfl"]:
            raise ValueError(f"the zygote starts `python -m mpcfl ...` only, not {argv}")
        import importlib.util
        import runpy

        import numpy as np
        import setproctitle
        import torch

        # Before the environment changes: the title takes the space of the inherited environment block.
        setproctitle.setproctitle(" ".join(argv))
        os.environ.clear()
        os.environ.update(request["env"] | private)
        os.chdir(request["cwd"])
        # Generators seeded from the OS at import would otherwise repeat in every child (no protocol
        # draws from them: its randomness is AES-CTR keyed per process after the fork).
        np.random.seed()
        torch.seed()
        spec = importlib.util.find_spec("mpcfl.__main__")
        sys.argv = [spec.origin if spec else "mpcfl", *argv[3:]]  # argv[0] as `python -m mpcfl` sets it
        try:
            runpy.run_module("mpcfl", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as stop:
            if stop.code is None or isinstance(stop.code, int):
                code = stop.code or 0
            else:
                print(stop.code, file=sys.stderr)
    except BaseException:  # as a cold interpreter would: the traceback, then status 1
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            import atexit

            threading._shutdown()  # type: ignore[attr-defined]  # joins non-daemon threads, as at a cold exit
            atexit._run_exitfuncs()  # what a cold interpreter runs at exit (logging, recorders)
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def serve(channel: socket.socket) -> None:
    """The zygote's loop: fork on each request, report each child's start and exit, and return when the
    launcher has closed its end and every child has ended."""
    children: set[int] = set()
    listening = True

    def tell(message: dict[str, int]) -> None:
        with contextlib.suppress(OSError):
            channel.send(json.dumps(message).encode())

    while listening or children:
        if listening and select.select([channel], [], [], _POLL_S)[0]:
            data, fds, _, _ = socket.recv_fds(channel, _MESSAGE_BYTES, 2)
            if not data:
                listening = False
            else:
                zygote = os.getpid()
                pid = os.fork()
                if pid == 0:
                    _become(data, fds, channel, zygote)
                with contextlib.suppress(OSError):  # the child may have set it, or exited, already
                    os.setpgid(pid, pid)
                for fd in fds:
                    os.close(fd)
                children.add(pid)
                tell({"started": pid})
        elif not listening:
            time.sleep(_POLL_S)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            tell({"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def main() -> None:
    channel = socket.socket(fileno=int(sys.argv[1]))
    # What every child imports, crypten excepted (its patches and generators are made in each child).
    # None of them opens a file or holds a key; torch and numpy seed generators from the OS at import,
    # which each child reseeds, and read settings from the environment, which every child shares.
    import gc
    import importlib

    for module in _PRELOAD:
        importlib.import_module(module)
    gc.freeze()  # the children's collections then leave these objects, and so their shared pages, alone
    serve(channel)
    os._exit(0)  # the children ran this interpreter's exit handlers; it has nothing of its own to run


if __name__ == "__main__":
    main()
