"""Run several processes of a multi-process test to completion: output in files, every one killed on time-out."""
import socket
import subprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_all(commands, logs, timeout: float, **popen) -> list[tuple[int, str]]:
    """Start ``commands`` (argument lists, or (arguments, env) pairs) at once, writing to the files ``logs`` (not
    pipes: a full pipe would stall a process); wait for all of them; (returncode, output) of each."""
    files = [open(path, "w+") for path in logs]
    procs = []
    for cmd, f in zip(commands, files):
        args, env = cmd if isinstance(cmd, tuple) else (cmd, None)
        procs.append(subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=env, **popen))
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    out = []
    for p, f in zip(procs, files):
        f.seek(0)
        out.append((p.returncode, f.read()))
        f.close()
    return out
