"""Loaded at startup by every process the enhancement tests start (it is first on their
PYTHONPATH, see tests/enhancement/netguard.py): installs the loopback-only network guard
before any code under test runs. Loaded by path: the child's sys.path is not complete
yet when Python imports this module."""

import importlib.util
import os

_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "netguard.py")
_spec = importlib.util.spec_from_file_location("_ku_netguard", _path)
assert _spec is not None and _spec.loader is not None
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
_module.install_in_child()
