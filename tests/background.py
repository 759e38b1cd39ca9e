"""Child processes that some tests need and that take long while using about one core (the Triton
interpreter, a compile in a fresh process): started as soon as the suite's tests are collected,
so that they run alongside the other tests on a 2-core machine, and awaited by their own tests.

A test declares its child with ``@pytest.mark.background_child("name")`` and a module-level
:func:`child` of that name; ``tests/conftest.py`` starts the children of the collected tests
that are not skipped, and :meth:`Child.result` waits (starting it then, if nothing did). Output
goes to files, not pipes, so a child that writes much never blocks on a full pipe.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: name -> Child, filled by the test modules at import.
CHILDREN: dict[str, Child] = {}


@dataclass
class Child:
    """One child process: ``argv`` (after the Python interpreter), extra environment variables;
    ``fresh_inductor_cache`` gives it an empty torch.compile cache of its own."""

    argv: list[str]
    env: dict = field(default_factory=dict)
    fresh_inductor_cache: bool = False
    _proc: subprocess.Popen | None = None
    _dir: str | None = None  # its stdout and stderr files, and the inductor cache if fresh
    _out: object = None
    _err: object = None

    def start(self) -> None:
        if self._proc is not None:
            return
        self._dir = tempfile.mkdtemp(prefix="qkv-child-")
        env = dict(os.environ, **self.env)
        if self.fresh_inductor_cache:
            env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(self._dir, "inductor")
        self._out = open(os.path.join(self._dir, "stdout"), "w+")
        self._err = open(os.path.join(self._dir, "stderr"), "w+")
        self._proc = subprocess.Popen([sys.executable, *self.argv], cwd=ROOT, env=env, stdout=self._out,
                                      stderr=self._err, text=True)

    def result(self, timeout: float = 600) -> subprocess.CompletedProcess:
        """Wait for the child (``subprocess.TimeoutExpired`` past ``timeout`` seconds) and return
        its exit status and output."""
        self.start()
        try:
            code = self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        outputs = []
        for f in (self._out, self._err):
            f.seek(0)
            outputs.append(f.read())
        return subprocess.CompletedProcess(self._proc.args, code, *outputs)

    def stop(self) -> None:
        """Kill the child if it still runs, and remove its files."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        for f in (self._out, self._err):
            if f is not None:
                f.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


def child(name: str, argv: list[str], **kwargs) -> Child:
    """Declare (once) the child a test module's ``background_child(name)`` test awaits."""
    return CHILDREN.setdefault(name, Child(argv, **kwargs))


def python_path() -> str:
    """``src`` and the repository root ahead of the caller's ``PYTHONPATH``, for children."""
    return os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])
