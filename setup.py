"""Build step for the one compiled piece: the death-signal trampoline.

Everything else is in pyproject.toml. `daemon/pdeathsig.c` becomes the
executable `agentd/daemon/agentd-pdeathsig` (next to spawn.py, in the source
tree for an editable install). Without a C compiler the build goes on and
agentd uses util-linux's `setpriv` instead (see daemon/spawn.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "daemon" / "pdeathsig.c"
NAME = "agentd-pdeathsig"


def compile_helper(target: Path) -> bool:
    """cc -static if the toolchain allows, else dynamic; False if there is no compiler."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None or not SOURCE.exists():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    for extra in (["-static"], []):
        cmd = [cc, "-O2", "-s", *extra, "-o", str(target), str(SOURCE)]
        if subprocess.run(cmd, capture_output=True).returncode == 0:
            target.chmod(0o755)
            return True
    return False


class BuildPyWithHelper(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            compile_helper(HERE / "daemon" / NAME)
        else:
            compile_helper(Path(self.build_lib) / "agentd" / "daemon" / NAME)


class PlatformDistribution(Distribution):
    """The wheel holds a compiled executable: tag it for this platform, not py3-none-any."""

    def has_ext_modules(self) -> bool:
        return True


setup(cmdclass={"build_py": BuildPyWithHelper}, distclass=PlatformDistribution)
