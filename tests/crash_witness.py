"""CI diagnostics: what native code printed just before the test process died of a fatal signal.

pytest captures file descriptors 1 and 2 into unlinked temporary files while a test runs, so a C++ library's last
words before an abort ("terminate called after throwing ...", an absl CHECK, a glibc malloc message) go into a file
that vanishes with the process; CI then shows only faulthandler's thread dump, which names no library. With
``CXR_CRASH_WITNESS=1`` (set by ``.ci/run``) a small watcher process holds those two files open; if the test process
ends without saying goodbye, the watcher prints what they hold to the terminal's stderr. Tests see no difference.
Uses pytest's capture internals; where they differ (another pytest, ``-s``) there is simply no witness.
"""

from __future__ import annotations

import os
import subprocess
import sys

_WATCHER = r"""
import os, select, sys
parent, out_fd, err_fd = (int(a) for a in sys.argv[1:4])
said = b""
while True:
    ready, _, _ = select.select([0], [], [], 0.5)
    if ready:
        chunk = os.read(0, 64)
        said += chunk
        if not chunk:
            break
    elif os.getppid() != parent:
        break
if b"goodbye" not in said:
    for name, fd in (("stdout", out_fd), ("stderr", err_fd)):
        size = os.fstat(fd).st_size
        tail = os.pread(fd, 4000, max(0, size - 4000))
        os.write(2, b"\n=== crash witness: the last %d bytes the dead test process wrote to its captured %s ===\n"
                 % (len(tail), name.encode()) + tail + b"\n=== end of the captured " + name.encode() + b" ===\n")
"""

_pipe_write: int | None = None
_watcher: subprocess.Popen | None = None


def start(config) -> None:
    """Start the watcher when CI asks for it and pytest's fd capture is in use."""
    global _pipe_write, _watcher
    if os.environ.get("CXR_CRASH_WITNESS") != "1" or _pipe_write is not None:
        return
    capman = config.pluginmanager.getplugin("capturemanager")
    capturing = getattr(capman, "_global_capturing", None)
    try:
        out_fd = capturing.out.tmpfile.fileno()
        err_fd = capturing.err.tmpfile.fileno()
        terminal_err = capturing.err.targetfd_save
    except AttributeError:  # -s, --capture=sys or another pytest: nothing of ours to watch
        return
    read_end, _pipe_write = os.pipe()
    _watcher = subprocess.Popen(
        [sys.executable, "-c", _WATCHER, str(os.getpid()), str(out_fd), str(err_fd)],
        stdin=read_end, stdout=terminal_err, stderr=terminal_err, pass_fds=(out_fd, err_fd),
    )
    os.close(read_end)


def stop() -> None:
    """Tell the watcher the run ended normally (it then exits silently)."""
    global _pipe_write, _watcher
    if _pipe_write is not None:
        os.write(_pipe_write, b"goodbye")
        os.close(_pipe_write)
        _pipe_write = None
        _watcher.wait(timeout=10)
        _watcher = None
