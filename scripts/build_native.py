"""Builds the C page walk of module-level PME re-encryption (``include/keyrotation/formats/_pme_pages.c``) next to
its source, for this Python: ``python scripts/build_native.py`` (``make install`` runs it). Without a C compiler,
zlib's headers or Python's, it says so and exits 0: ``keyrotation.formats.pme_modules`` then walks pages in Python,
with the same results, more slowly (``pme_modules.NATIVE`` says which)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "include" / "keyrotation" / "formats" / "_pme_pages.c"


def main() -> int:
    target = SOURCE.with_name("_pme_pages" + sysconfig.get_config_var("EXT_SUFFIX"))
    if target.exists() and target.stat().st_mtime >= SOURCE.stat().st_mtime:
        return 0
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    if not shutil.which(cc[0]):
        print(f"build_native: no C compiler ({cc[0]}): module-level re-encryption walks pages in Python", flush=True)
        return 0
    partial = target.with_suffix(".partial")
    command = [*cc, "-O2", "-shared", "-fPIC", "-Wall", "-Wextra", "-Wno-unused-parameter",
               f"-I{sysconfig.get_paths()['include']}", str(SOURCE), "-lz", "-o", str(partial)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        partial.unlink(missing_ok=True)
        print(f"build_native: {' '.join(command)} failed; module-level re-encryption walks pages in Python:\n"
              f"{done.stderr}", flush=True)
        return 0
    partial.replace(target)
    print(f"build_native: built {target.name}" + (f"\n{done.stderr}" if done.stderr else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
