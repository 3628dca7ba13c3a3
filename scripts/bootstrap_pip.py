"""Puts pip into a virtual environment made with ``python -m venv --without-pip``.

Run by scripts/_env.sh with the new environment's python, when the system Python has no
``ensurepip`` (Debian and Ubuntu without the ``python3-venv`` package). Uses, in order:

1. ``$CLIPAX_PIP_WHEEL``: a path to a pip wheel you downloaded yourself;
2. a pip wheel the system already has (``/usr/share/python-wheels``, Debian's python3-pip-whl);
3. the newest pip wheel from PyPI (``https://pypi.org/pypi/pip/json``), its sha256 checked.

The wheel's own pip then installs the wheel (pip runs from a wheel file), so no pip is needed
beforehand. Only the standard library is used.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request

PYPI_JSON = "https://pypi.org/pypi/pip/json"
SYSTEM_WHEELS = "/usr/share/python-wheels/pip-*.whl"


def _version_key(path: str) -> tuple[int, ...]:
  version = os.path.basename(path).split("-")[1]
  return tuple(int(p) if p.isdigit() else 0 for p in version.split("."))


def _from_pypi(folder: str) -> str:
  print(f"    downloading the newest pip wheel from {PYPI_JSON}", flush=True)
  with urllib.request.urlopen(PYPI_JSON, timeout=60) as response:
    release = json.load(response)
  wheel = next(u for u in release["urls"] if u["packagetype"] == "bdist_wheel")
  path = os.path.join(folder, wheel["filename"])
  url = urllib.parse.urljoin(PYPI_JSON, wheel["url"])  # mirrors may give a relative address
  with urllib.request.urlopen(url, timeout=120) as response:
    data = response.read()
  digest = hashlib.sha256(data).hexdigest()
  if digest != wheel["digests"]["sha256"]:
    raise SystemExit(f"error: {url} has sha256 {digest}, PyPI says "
                     f"{wheel['digests']['sha256']}")
  with open(path, "wb") as f:
    f.write(data)
  return path


def main() -> int:
  if sys.prefix == sys.base_prefix:
    raise SystemExit("error: run bootstrap_pip.py with a virtual environment's python")
  with tempfile.TemporaryDirectory() as folder:
    wheel = os.environ.get("CLIPAX_PIP_WHEEL")
    if not wheel:
      local = sorted(glob.glob(SYSTEM_WHEELS), key=_version_key)
      wheel = local[-1] if local else None
    if wheel:
      print(f"    using {wheel}", flush=True)
    else:
      try:
        wheel = _from_pypi(folder)
      except (OSError, ValueError, KeyError, StopIteration) as e:
        raise SystemExit(
            f"error: could not download pip ({e}). Either install the python3-venv package "
            "(Debian/Ubuntu: sudo apt-get install python3-venv) or download a pip wheel from "
            "https://pypi.org/project/pip/#files and set CLIPAX_PIP_WHEEL=/path/to/it"
        ) from None
    command = [sys.executable, os.path.join(wheel, "pip"), "install", "--no-index",
               "--disable-pip-version-check", wheel]
    return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
  sys.exit(main())
